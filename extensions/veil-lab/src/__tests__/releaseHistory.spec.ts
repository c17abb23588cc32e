import type { IRelease } from '../api';
import {
  ReleaseHistory,
  releasesFromNotebook,
  shortReceipt
} from '../releaseHistory';

function rel(receipt: string, overrides: Partial<IRelease> = {}): IRelease {
  return {
    site: 'north',
    dataset: 'encounters',
    query: 'SELECT COUNT(*) AS n FROM encounters',
    cost: { rho: 0.005, delta: 0, epsilon: 0.1, epsilon_delta: 0.1 },
    receipt,
    mock: false,
    ...overrides
  };
}

function output(releases: unknown) {
  return {
    output_type: 'display_data',
    data: { 'text/plain': 'n = 1204 ± 12' },
    metadata: { veil: { releases } }
  };
}

const notebook = {
  nbformat: 4,
  nbformat_minor: 5,
  metadata: {},
  cells: [
    { cell_type: 'markdown', source: '# Study', metadata: {} },
    {
      cell_type: 'code',
      source: 'print(1)',
      metadata: {},
      outputs: [
        { output_type: 'stream', name: 'stdout', text: '1\n' },
        { output_type: 'execute_result', data: {}, metadata: {} }
      ]
    },
    {
      cell_type: 'code',
      source: '%%veil sql --site north',
      metadata: {},
      outputs: [output([rel('r1'), rel('m1', { mock: true })])]
    },
    {
      cell_type: 'code',
      source: '%%veil sql --site central',
      metadata: {},
      outputs: [
        output([
          rel('r2', { site: 'central', cost: { epsilon: 0.25 } }),
          rel('r3', { cost: { epsilon: 0.4 } })
        ])
      ]
    }
  ]
};

describe('releasesFromNotebook', () => {
  it('reads output.metadata.veil.releases from code cells', () => {
    const found = releasesFromNotebook(notebook);
    expect(found.map(r => r.receipt)).toEqual(['r1', 'm1', 'r2', 'r3']);
  });

  it('returns nothing for a notebook without Veil metadata', () => {
    expect(
      releasesFromNotebook({
        cells: [
          {
            cell_type: 'code',
            outputs: [
              { metadata: {} },
              { metadata: { veil: {} } },
              { metadata: { veil: { releases: 'nope' } } },
              {}
            ]
          },
          { cell_type: 'code' }
        ]
      })
    ).toEqual([]);
    expect(releasesFromNotebook({})).toEqual([]);
  });

  it('skips malformed entries and normalizes costs', () => {
    const found = releasesFromNotebook({
      cells: [
        {
          cell_type: 'code',
          outputs: [
            output([
              null,
              { site: 'north' },
              { receipt: 'x' },
              { site: 'north', receipt: 'ok', cost: { epsilon: 'big' } }
            ])
          ]
        }
      ]
    });
    expect(found).toHaveLength(1);
    expect(found[0]).toMatchObject({
      site: 'north',
      receipt: 'ok',
      dataset: '',
      cost: { epsilon: 0 },
      mock: false
    });
  });
});

describe('ReleaseHistory', () => {
  it('loads live releases and ignores mock ones', () => {
    const history = new ReleaseHistory();
    expect(history.loadNotebook(notebook)).toBe(3);
    expect(history.releases.map(r => r.receipt)).toEqual(['r1', 'r2', 'r3']);
  });

  it('dedupes by receipt across reloads and comm events', () => {
    const history = new ReleaseHistory();
    let emitted = 0;
    history.changed.connect(() => emitted++);
    history.loadNotebook(notebook);
    expect(history.loadNotebook(notebook)).toBe(0);
    expect(history.add(rel('r1'))).toBe(false);
    expect(history.size).toBe(3);
    expect(emitted).toBe(1);
    expect(history.add(rel('r4', { site: 'valley' }))).toBe(true);
    expect(history.size).toBe(4);
    expect(emitted).toBe(2);
  });

  it('ignores mock releases pushed over the comm', () => {
    const history = new ReleaseHistory();
    expect(history.add(rel('m2', { mock: true }))).toBe(false);
    expect(history.size).toBe(0);
  });

  it('keeps comm releases when the saved notebook does not have them yet', () => {
    const history = new ReleaseHistory();
    history.add(rel('live-only'));
    history.loadNotebook(notebook);
    expect(history.releases.map(r => r.receipt)).toEqual([
      'live-only',
      'r1',
      'r2',
      'r3'
    ]);
  });

  it('totals epsilon per site', () => {
    const history = new ReleaseHistory();
    history.loadNotebook(notebook);
    const totals = history.totals();
    expect(totals.map(t => t.site)).toEqual(['north', 'central']);
    expect(totals[0].count).toBe(2);
    expect(totals[0].epsilon).toBeCloseTo(0.5);
    expect(totals[1]).toEqual({ site: 'central', count: 1, epsilon: 0.25 });
  });

  it('records receipt verifications', () => {
    const history = new ReleaseHistory();
    history.loadNotebook(notebook);
    expect(history.unverified()).toHaveLength(3);
    history.setVerifications([
      { site: 'north', receipt: 'r1', ok: true, detail: 'entry 12' },
      { site: 'central', receipt: 'r2', ok: false, detail: 'unknown receipt' },
      { site: 'north', receipt: 'other', ok: true, detail: '' }
    ]);
    expect(history.verification('r1')).toEqual({
      ok: true,
      detail: 'entry 12'
    });
    expect(history.verification('r2')?.ok).toBe(false);
    expect(history.verification('other')).toBeUndefined();
    expect(history.unverified().map(r => r.receipt)).toEqual(['r3']);
  });
});

describe('shortReceipt', () => {
  it('shortens long hashes only', () => {
    expect(shortReceipt('abc')).toBe('abc');
    expect(shortReceipt('0123456789abcdef')).toBe('0123456789ab…');
  });
});
