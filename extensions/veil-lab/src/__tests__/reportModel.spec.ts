import {
  chartOf,
  IReportLine,
  lineName,
  NO_REPORT_FILTERS,
  reportQuery
} from '../reportModel';

describe('reportQuery', () => {
  it('sends the site and the non-empty filters', () => {
    const params = new URLSearchParams(
      reportQuery('north & co', {
        ...NO_REPORT_FILTERS,
        since: '2026-01-01',
        project: ' rare_peds '
      })
    );
    expect(params.get('site')).toBe('north & co');
    expect(params.get('since')).toBe('2026-01-01');
    expect(params.get('project')).toBe('rare_peds');
    expect(params.has('until')).toBe(false);
    expect(params.has('dataset')).toBe(false);
  });
});

describe('chartOf', () => {
  const timelines = [
    {
      dataset: 'encounters',
      points: [
        { ts: '2026-01-01T00:00:00+00:00', epsilon: 0, seq: 0 },
        { ts: '2026-01-02T00:00:00+00:00', epsilon: 1, seq: 5 },
        { ts: '2026-01-03T00:00:00+00:00', epsilon: 2, seq: 9 }
      ]
    },
    {
      dataset: 'patients',
      points: [{ ts: '2026-01-01T00:00:00+00:00', epsilon: 0.5, seq: 0 }]
    }
  ];

  it('draws cumulative spend as steps from the bottom-left to the top', () => {
    const chart = chartOf(timelines, 200, 100);
    expect(chart).not.toBeNull();
    expect(chart!.top).toBe(2);
    expect(chart!.start).toBe('2026-01-01T00:00:00+00:00');
    expect(chart!.end).toBe('2026-01-03T00:00:00+00:00');
    const [encounters, patients] = chart!.lines;
    // (0, 0) at the bottom; a step holds the old spend until the next charge
    expect(encounters.points).toBe('0,100 100,100 100,50 200,50 200,0 200,0');
    expect(encounters.last).toBe(2);
    // a dataset with no charge in the period runs flat to the right edge
    expect(patients.points).toBe('0,75 200,75');
  });

  it('has nothing to draw without points', () => {
    expect(chartOf([], 200, 100)).toBeNull();
    expect(chartOf([{ dataset: 'd', points: [] }], 200, 100)).toBeNull();
  });
});

describe('lineName', () => {
  it('names the project and dataset, or the site itself', () => {
    const line = { dataset: 'encounters', project: 'p1' } as IReportLine;
    expect(lineName(line)).toBe('project p1, encounters');
    expect(lineName({ ...line, project: null, dataset: null })).toBe(
      "the site's own, no dataset"
    );
  });
});
