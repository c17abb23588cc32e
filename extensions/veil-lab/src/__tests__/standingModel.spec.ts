import { IStandingInfo, IStandingResponse } from '../api';
import {
  addDays,
  budgetTooltip,
  describeBudget,
  describeLastReleased,
  describeProgress,
  describeStatus,
  formatUtc,
  lastReleased,
  nextRelease,
  noStandingQueries,
  relativeTime,
  siteStanding,
  windowSpan
} from '../standingModel';

function standing(over: Partial<IStandingInfo> = {}): IStandingInfo {
  return {
    id: 1,
    project: 'flu_watch',
    dataset: 'encounters',
    application_id: 4,
    spec: {
      name: 'ili_weekly',
      sql: 'SELECT COUNT(*) FROM encounters',
      time_column: 'encounter_date',
      start: '2026-01-05',
      window_days: 7,
      horizon: 52,
      max_windows: 4,
      lag_days: 2,
      confidence: 0.95
    },
    status: 'active',
    status_reason: null,
    epsilon: 2,
    delta: 1e-6,
    rho: 0.0123456,
    levels: 6,
    noise_scale: 3.1,
    windows_released: 3,
    next_window: 3,
    next_release_at: '2026-02-04T00:00:00+00:00',
    created_at: '2026-01-02T10:00:00+00:00',
    receipt: 'ab'.repeat(32),
    ...over
  };
}

describe('windows', () => {
  it('counts UTC calendar days', () => {
    expect(addDays('2026-01-05', 7)).toBe('2026-01-12');
    expect(addDays('2024-02-27', 2)).toBe('2024-02-29'); // a leap day
    expect(addDays('2026-03-28', 3)).toBe('2026-03-31'); // whatever the local DST
  });

  it('gives a window its first and last day', () => {
    const spec = standing().spec;
    expect(windowSpan(spec, 0)).toEqual({
      window: 0,
      first: '2026-01-05',
      last: '2026-01-11'
    });
    expect(windowSpan({ ...spec, window_days: 1 }, 2)).toEqual({
      window: 2,
      first: '2026-01-07',
      last: '2026-01-07'
    });
  });

  it('names the last released window, as people count', () => {
    expect(lastReleased(standing({ windows_released: 0 }))).toBeNull();
    expect(describeLastReleased(standing({ windows_released: 0 }))).toBe(
      'none yet'
    );
    expect(describeLastReleased(standing())).toBe(
      'window 3 (2026-01-19 to 2026-01-25)'
    );
    const daily = standing();
    daily.spec = { ...daily.spec, window_days: 1 };
    expect(describeLastReleased(daily)).toBe('window 3 (2026-01-07)');
    expect(describeProgress(standing())).toBe('3 / 52 windows');
  });
});

describe('the next release', () => {
  const now = new Date('2026-02-01T12:00:00Z');

  it('is relative and absolute', () => {
    expect(nextRelease(standing(), now)).toEqual({
      relative: 'in 2 days',
      absolute: '2026-02-04 00:00 UTC',
      window: 4
    });
  });

  it('reads in minutes, hours or days, and "due now" once past', () => {
    const at = (ms: number) => new Date(now.getTime() + ms);
    expect(relativeTime(at(30_000), now)).toBe('in 1 min');
    expect(relativeTime(at(59 * 60_000), now)).toBe('in 59 min');
    expect(relativeTime(at(5 * 3_600_000 + 60_000), now)).toBe('in 5 h');
    expect(relativeTime(at(47 * 3_600_000), now)).toBe('in 47 h');
    expect(relativeTime(at(9 * 86_400_000), now)).toBe('in 9 days');
    expect(relativeTime(at(0), now)).toBe('due now');
    expect(relativeTime(at(-3_600_000), now)).toBe('due now');
    expect(formatUtc(new Date('nonsense'))).toBe('');
  });

  it('is none once finished or stopped', () => {
    const finished = standing({
      status: 'finished',
      windows_released: 52,
      next_window: null,
      next_release_at: null
    });
    expect(nextRelease(finished, now)).toEqual({
      relative: 'finished',
      absolute: '',
      window: null
    });
    const stopped = standing({
      status: 'stopped',
      status_reason: 'dataset retired',
      next_window: null,
      next_release_at: null
    });
    expect(nextRelease(stopped, now).relative).toBe('stopped');
    expect(describeStatus(stopped)).toBe('stopped: dataset retired');
    expect(describeStatus(standing())).toBe('active');
  });
});

describe('the budget', () => {
  it('is the whole horizon, charged once', () => {
    expect(describeBudget(standing())).toBe('ε 2.00');
    const tip = budgetTooltip(standing());
    expect(tip).toContain("at δ 1e-6, the site's reporting δ");
    expect(tip).toContain('ρ 0.0123');
    expect(tip).toContain('charged once, up front, for all 52 windows');
    expect(tip.split('\n')).toHaveLength(1);
  });
});

describe('sites', () => {
  const response: IStandingResponse = {
    project: 'flu_watch',
    sites: {
      valley: { status: 'unreachable', error: 'could not be reached' },
      north: { status: 'ok', standing: [standing()] },
      central: { status: 'refused', error: 'no such route' }
    }
  };

  it('are listed by name; a failed one says why without hiding the others', () => {
    const sites = siteStanding(response);
    expect(sites.map(s => s.site)).toEqual(['central', 'north', 'valley']);
    expect(sites[0].error).toBe('central refused: no such route');
    expect(sites[1]).toEqual({
      site: 'north',
      queries: [standing()],
      error: null
    });
    expect(sites[2].error).toBe('valley unreachable: could not be reached');
    expect(noStandingQueries(sites)).toBe(false);
  });

  it('with none anywhere, the panel shows how to set one up', () => {
    const sites = siteStanding({
      project: 'p',
      sites: {
        north: { status: 'ok', standing: [] },
        valley: { status: 'unreachable', error: 'down' }
      }
    });
    expect(noStandingQueries(sites)).toBe(true);
    expect(siteStanding({ project: 'p', sites: {} })).toEqual([]);
  });
});
