import type { IRelease } from '../api';
import {
  describeCost,
  describeGrantState,
  needsLiveNotice,
  parseGrant,
  ReleaseHistory,
  releasesFromNotebook,
  shortReceipt,
  withRelease
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

function grant(spent: number, next: number) {
  return {
    epsilon_granted: 4,
    epsilon_spent: spent,
    largest_next_epsilon: next,
    rho_granted: 0.2,
    rho: 0.15,
    delta: 1e-6
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

  it('gives the grant after the latest release per site and dataset, never a sum of epsilons', () => {
    const history = new ReleaseHistory();
    history.add(rel('a', { grant: grant(0.9, 3) }));
    history.add(rel('b', { grant: grant(1.2, 2.7) }));
    history.add(rel('c', { dataset: 'patients' })); // an older kernel: no grant
    const states = history.grantStates();
    expect(states.map(s => [s.site, s.dataset, s.count])).toEqual([
      ['north', 'encounters', 2],
      ['north', 'patients', 1]
    ]);
    expect(states[0].grant).toEqual(grant(1.2, 2.7));
    expect(states[0].receipt).toBe('b');
    expect(states[1].grant).toBeNull();
    // epsilon spent is the site's figure (1.2), not 0.1 + 0.1
    expect(describeGrantState(states[0].grant)).toBe(
      'granted ε 4.00 · spent 1.20 · largest next release 2.70'
    );
    expect(describeGrantState(null)).toContain('not recorded');
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

describe('notebook metadata (releases never displayed)', () => {
  it('appends each live release once, keeping other Veil metadata', () => {
    const first = withRelease({ other: 1 }, rel('r1', { grant: grant(1, 3) }));
    expect(first).not.toBeNull();
    expect(first!.other).toBe(1);
    expect(first!.releases).toHaveLength(1);
    // the comm event's `type` is not kept
    const event = { ...rel('r2'), type: 'budget' } as IRelease;
    const second = withRelease(first, event)!;
    expect((second.releases as any[]).map(r => r.receipt)).toEqual([
      'r1',
      'r2'
    ]);
    expect((second.releases as any[])[1].type).toBeUndefined();
    expect((second.releases as any[])[0].grant).toEqual(grant(1, 3));
    expect(withRelease(second, rel('r1'))).toBeNull();
    expect(withRelease(undefined, rel('m', { mock: true }))).toBeNull();
    expect(withRelease(undefined, { site: 'x' } as any)).toBeNull();
  });

  it('builds the history from notebook metadata and outputs, de-duplicated by receipt', () => {
    const nb = {
      ...notebook,
      metadata: {
        veil: {
          releases: [
            rel('hidden', { grant: grant(0.5, 3.3) }),
            rel('r1', { grant: grant(0.8, 3) })
          ]
        }
      }
    };
    const history = new ReleaseHistory();
    expect(history.loadNotebook(nb)).toBe(4);
    expect(history.releases.map(r => r.receipt)).toEqual([
      'hidden',
      'r1',
      'r2',
      'r3'
    ]);
    expect(history.releases[1].grant).toEqual(grant(0.8, 3));
    expect(history.loadNotebook(nb)).toBe(0);
    // shown releases know their cell; the undisplayed one does not
    expect(history.cellOf('r1')).toEqual({ index: 2, id: null });
    expect(history.cellOf('r3')).toEqual({ index: 3, id: null });
    expect(history.cellOf('hidden')).toBeUndefined();
    expect(history.inOutputs).toBe(3);
  });

  it('finds cells by id and follows them when they move', () => {
    const cells = (order: string[]) =>
      order.map(id => ({
        id,
        cell_type: 'code',
        outputs: id === 'q' ? [output([rel('r9')])] : []
      }));
    const history = new ReleaseHistory();
    history.loadNotebook({ cells: cells(['a', 'q']) });
    expect(history.cellOf('r9')).toEqual({ index: 1, id: 'q' });
    let changed = 0;
    history.changed.connect(() => changed++);
    history.loadNotebook({ cells: cells(['q', 'a']) });
    expect(history.cellOf('r9')).toEqual({ index: 0, id: 'q' });
    expect(changed).toBe(1);
    // the output cleared: the release stays (in the metadata), without a cell
    history.loadNotebook({
      cells: [{ id: 'q', cell_type: 'code', outputs: [] }]
    });
    expect(history.size).toBe(1);
    expect(history.cellOf('r9')).toBeUndefined();
  });

  it('fills in the grant of a release first seen without it', () => {
    const history = new ReleaseHistory();
    history.add(rel('r1'));
    history.loadNotebook({
      metadata: { veil: { releases: [rel('r1', { grant: grant(1, 2) })] } }
    });
    expect(history.releases[0].grant).toEqual(grant(1, 2));
  });
});

describe('grant and cost figures', () => {
  it('keeps only the numeric figures of a grant', () => {
    expect(
      parseGrant({ epsilon_spent: 1, rho: 0.1, bogus: 2, delta: 'x' })
    ).toEqual({
      epsilon_spent: 1,
      rho: 0.1
    });
    expect(parseGrant({})).toBeNull();
    expect(parseGrant(null)).toBeNull();
  });

  it("describes a release's cost at the reporting delta, with its rho", () => {
    expect(describeCost({ epsilon: 0.5, delta: 1e-6, rho: 0.0125 })).toBe(
      'ε 0.5 at δ 0.000001, ρ 0.0125'
    );
    // a zCDP release spends no delta: its epsilon is read at the reporting delta
    expect(
      describeCost({
        epsilon: 0.5,
        delta: 0,
        epsilon_delta: 1e-6,
        rho: 0.00664
      })
    ).toBe('ε 0.5 at δ 0.000001, ρ 0.00664');
    expect(
      describeCost({ epsilon: 0.8, delta: 1e-7, epsilon_delta: 1e-6 })
    ).toBe('ε 0.8 at δ 0.000001, δ spent 1e-7');
    expect(describeCost({ epsilon: 1.234 })).toBe('ε 1.23');
  });
});

describe('needsLiveNotice', () => {
  it('warns only when live outputs meet a kernel in mock mode', () => {
    expect(needsLiveNotice('mock', 2)).toBe(true);
    expect(needsLiveNotice('live', 2)).toBe(false);
    expect(needsLiveNotice('mock', 0)).toBe(false);
    expect(needsLiveNotice(null, 2)).toBe(false); // the kernel has not said yet
  });
});
