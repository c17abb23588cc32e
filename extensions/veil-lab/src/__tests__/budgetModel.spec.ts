import type {
  IApplicationInfo,
  IBudgetEvent,
  IBudgetResponse,
  IExistingGrant
} from '../api';
import {
  BudgetModel,
  describeGrant,
  formatEpsilon,
  grantsToDecide,
  isGrantLow,
  NEXT_RELEASE_NOTE,
  reviewBlocked
} from '../budgetModel';

/**
 * A grant: `epsilon` granted, `next` the largest next release. Spent is not
 * granted minus next (epsilons do not add up), so it is its own argument.
 */
function grant(
  dataset: string,
  epsilon: number,
  next: number,
  status = 'active',
  spent = epsilon / 4
) {
  return {
    dataset,
    epsilon,
    epsilon_spent: spent,
    largest_next_epsilon: next,
    status: status as 'active' | 'revoked' | 'expired',
    expires_at: null
  };
}

/**
 * Figures from the site's own conversion (OpenDP, delta 1e-6): a grant whose
 * largest next release is ε 3.2 has rho 0.20805 left; a release at ε 0.5 costs
 * rho 0.0066415, after which the largest next release is ε 3.1432 (not 2.7).
 */
const RHO_LEFT = 0.20805168188844944;
const RELEASE_RHO = 0.006641524356660497;
const NEXT_AFTER = 3.1432146321378083;

const healthy: IBudgetResponse = {
  project: 'sepsis-2026',
  sites: {
    north: { status: 'ok', grants: [grant('encounters', 4, 3.2)] },
    central: { status: 'ok', grants: [grant('labs', 5, 4.0)] },
    valley: { status: 'ok', grants: [grant('encounters', 2, 1.1)] }
  }
};

function release(overrides: Partial<IBudgetEvent> = {}): IBudgetEvent {
  return {
    type: 'budget',
    site: 'north',
    dataset: 'encounters',
    query: 'SELECT COUNT(*) AS n FROM encounters',
    cost: { rho: 0.005, delta: 0, epsilon: 0.5, epsilon_delta: 0.5 },
    receipt: 'a'.repeat(64),
    mock: false,
    ...overrides
  };
}

describe('BudgetModel', () => {
  it('summarizes the largest next release per site in server order', () => {
    const model = new BudgetModel();
    let emitted = 0;
    model.changed.connect(() => emitted++);
    model.update(healthy);
    expect(emitted).toBe(1);
    expect(model.project).toBe('sepsis-2026');
    expect(model.sites.map(s => s.site)).toEqual([
      'north',
      'central',
      'valley'
    ]);
    expect(model.text).toBe(
      'Veil ε for the next release: north 3.20 · central 4.00 · valley 1.10'
    );
    expect(model.low).toBe(false);
    expect(model.hasError).toBe(false);
  });

  it('flags a grant below 20% of its epsilon as low', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: { status: 'ok', grants: [grant('encounters', 10, 1.99)] }
      }
    });
    expect(model.low).toBe(true);
    expect(model.site('north')!.low).toBe(true);
  });

  it('uses a strict 20% threshold and ignores inactive grants', () => {
    expect(isGrantLow(grant('d', 10, 2))).toBe(false);
    expect(isGrantLow(grant('d', 10, 1.999))).toBe(true);
    expect(isGrantLow(grant('d', 10, 0, 'revoked'))).toBe(false);
    expect(isGrantLow(grant('d', 10, 0, 'expired'))).toBe(false);
    expect(isGrantLow(grant('d', 0, 0))).toBe(false);
  });

  it('warns when any dataset of any site is low', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: {
          status: 'ok',
          grants: [grant('encounters', 4, 3.5), grant('labs', 1, 0.1)]
        },
        central: { status: 'ok', grants: [grant('labs', 5, 4.0)] }
      }
    });
    expect(model.low).toBe(true);
    expect(model.site('central')!.low).toBe(false);
    // A release is on one dataset: the site's figure is what fits on any of its active grants, never a sum.
    expect(model.site('north')!.largestNext).toBeCloseTo(0.1);
  });

  it('reports an unreachable site as an error', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: { status: 'ok', grants: [grant('encounters', 4, 3.2)] },
        valley: { status: 'unreachable', error: 'connection refused' }
      }
    });
    expect(model.hasError).toBe(true);
    expect(model.unreachableSites).toEqual(['valley']);
    expect(model.text).toBe('Veil: valley unreachable');
    expect(model.tooltip).toContain('valley: unreachable (connection refused)');
    expect(model.site('valley')!.reachable).toBe(false);
  });

  it('reports a failed request and clears it on the next update', () => {
    const model = new BudgetModel();
    model.setError('HTTP 502');
    expect(model.hasError).toBe(true);
    expect(model.text).toBe('Veil: budget unavailable');
    model.update(healthy);
    expect(model.hasError).toBe(false);
    expect(model.requestError).toBeNull();
  });

  it('charges a live release to the matching grant', () => {
    const model = new BudgetModel();
    model.update(healthy);
    let emitted = 0;
    model.changed.connect(() => emitted++);
    // Without its rho, a release's epsilon is subtracted: a lower bound until the refetch.
    expect(model.applyRelease(release({ cost: { epsilon: 2.7 } }))).toBe(true);
    expect(emitted).toBe(1);
    const north = model.site('north')!;
    expect(north.largestNext).toBeCloseTo(0.5);
    expect(north.grants[0].epsilon_spent).toBeCloseTo(3.7);
    // 0.5 < 0.2 * 4: the release pushed the grant under the threshold.
    expect(model.low).toBe(true);
    expect(model.text).toBe(
      'Veil ε for the next release: north 0.5 · central 4.00 · valley 1.10'
    );
  });

  it('charges rho exactly and never overstates the largest next release', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: {
          status: 'ok',
          grants: [
            {
              ...grant('encounters', 4, 3.2),
              rho_total: 0.31106495493324654,
              rho_spent: 0.31106495493324654 - RHO_LEFT,
              rho_remaining: RHO_LEFT
            }
          ]
        }
      }
    });
    const cost = {
      rho: RELEASE_RHO,
      delta: 0,
      epsilon: 0.5,
      epsilon_delta: 1e-6
    };
    expect(model.applyRelease(release({ cost }))).toBe(true);
    const g = model.site('north')!.grants[0];
    expect(g.rho_remaining).toBeCloseTo(RHO_LEFT - RELEASE_RHO, 12);
    expect(g.rho_spent).toBeCloseTo(
      0.31106495493324654 - RHO_LEFT + RELEASE_RHO,
      12
    );
    // epsilons do not add up: 3.2 - 0.5 = 2.7 would understate it badly; the rho left, scaled, comes close
    expect(g.largest_next_epsilon).toBeLessThanOrEqual(NEXT_AFTER);
    expect(g.largest_next_epsilon).toBeGreaterThan(3.05);
    // spent grows by at most the release's epsilon
    expect(g.epsilon_spent).toBeCloseTo(1 + 0.5);
    // all of the rho: nothing left for the next release
    model.applyRelease(release({ cost: { ...cost, rho: 1 } }));
    expect(model.site('north')!.largestNext).toBe(0);
  });

  it('labels granted, spent and the largest next release', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: {
          status: 'ok',
          grants: [grant('encounters', 2, 0.8, 'active', 1.5)]
        }
      }
    });
    // one site, one grant: all three figures in the status bar (spent + next > granted is no bug)
    expect(model.text).toBe(
      'Veil north: ε 0.8 for the next release (granted 2.00, spent 1.50)'
    );
    expect(model.tooltip).toContain(
      'north/encounters: ε granted 2.00, spent 1.50, largest next release 0.8'
    );
    expect(model.tooltip).toContain(NEXT_RELEASE_NOTE);
    expect(model.tooltip).not.toMatch(/remaining|left/);
    // several sites: the largest next release per site, each grant's figures in the tooltip
    model.update(healthy);
    expect(model.text).toMatch(/^Veil ε for the next release: north 3\.20/);
    expect(model.tooltip).toContain(
      'valley/encounters: ε granted 2.00, spent 0.5, largest next release 1.10'
    );
  });

  it("takes the site's own figures when the release carries its grant", () => {
    const model = new BudgetModel();
    model.update(healthy);
    const after = {
      epsilon_granted: 4,
      epsilon_spent: 1.37,
      largest_next_epsilon: NEXT_AFTER,
      rho_granted: 0.31,
      rho: RHO_LEFT - RELEASE_RHO,
      delta: 1e-6
    };
    expect(
      model.applyRelease(
        release({ cost: { epsilon: 0.5, rho: RELEASE_RHO }, grant: after })
      )
    ).toBe(true);
    const g = model.site('north')!.grants[0];
    expect(g.largest_next_epsilon).toBe(NEXT_AFTER);
    expect(g.epsilon_spent).toBe(1.37);
    expect(g.rho_remaining).toBe(RHO_LEFT - RELEASE_RHO);
    expect(g.rho_spent).toBeCloseTo(0.31 - RHO_LEFT + RELEASE_RHO, 12);
    expect(model.site('north')!.largestNext).toBe(NEXT_AFTER);
  });

  it('ignores mock releases and unknown sites or datasets', () => {
    const model = new BudgetModel();
    model.update(healthy);
    expect(model.applyRelease(release({ mock: true }))).toBe(false);
    expect(model.applyRelease(release({ site: 'elsewhere' }))).toBe(false);
    expect(model.applyRelease(release({ dataset: 'notes' }))).toBe(false);
    expect(model.site('north')!.largestNext).toBeCloseTo(3.2);
  });

  it('never shows a negative largest next release', () => {
    const model = new BudgetModel();
    model.update(healthy);
    model.applyRelease(release({ cost: { epsilon: 10 } }));
    expect(model.site('north')!.largestNext).toBe(0);
  });

  it('does not mutate the response it was given', () => {
    const model = new BudgetModel();
    const json = JSON.parse(JSON.stringify(healthy)) as IBudgetResponse;
    model.update(json);
    model.applyRelease(release());
    const north = json.sites.north as {
      grants: { largest_next_epsilon: number }[];
    };
    expect(north.grants[0].largest_next_epsilon).toBe(3.2);
  });
});

describe('formatEpsilon', () => {
  it('formats for people', () => {
    expect(formatEpsilon(3.2)).toBe('3.20');
    expect(formatEpsilon(39.987)).toBe('39.98');
    expect(formatEpsilon(4)).toBe('4.00');
    expect(formatEpsilon(0.05)).toBe('0.05');
    expect(formatEpsilon(0.123456)).toBe('0.12');
    expect(formatEpsilon(0)).toBe('0');
    expect(formatEpsilon(-1)).toBe('0');
    expect(formatEpsilon(NaN)).toBe('–');
  });
});

describe('existing grants on an application card', () => {
  const held = (id: number, applicationId: number | null): IExistingGrant => ({
    id,
    project: 'study1',
    dataset: 'encounters',
    application_id: applicationId,
    epsilon: 8,
    epsilon_spent: 0.5,
    largest_next_epsilon: 7.6,
    status: 'active',
    expires_at: null
  });
  const app = (grants: IExistingGrant[]): IApplicationInfo => ({
    id: 7,
    project: 'study1',
    applicant: 'alice',
    status: 'pending',
    version: 1,
    request: {
      purpose: 'A smaller follow-up on encounters',
      datasets: ['encounters'],
      epsilon: 2,
      duration_days: 90,
      delta: 1e-6,
      uses: ['query'],
      ethics_ref: null,
      model_source: null
    },
    rule: { level: 'L2', reviewers: 1, offices: [] },
    reviews: [],
    needs: '1 more approving reviewer',
    existing_grants: grants
  });

  it('shows granted, spent, largest next release and expiry', () => {
    expect(describeGrant(held(3, null))).toBe(
      'grant 3 on encounters: ε granted 8.00, spent 0.5, largest next release 7.60, no expiry'
    );
    expect(
      describeGrant({
        ...held(3, null),
        expires_at: '2027-03-04T10:00:00+00:00'
      })
    ).toContain('expires 2027-03-04');
  });

  it("asks about another application's grant, not the application's own", () => {
    expect(
      grantsToDecide(app([held(3, null), held(4, 2)])).map(g => g.id)
    ).toEqual([3, 4]);
    expect(grantsToDecide(app([held(5, 7)]))).toEqual([]);
    expect(grantsToDecide(app([]))).toEqual([]);
  });
});

describe('reviewBlocked', () => {
  const me = { principal: 'carol', role: 'steward', project: null };
  const app = (status: string, reviews: [string, number][], version = 1) =>
    ({
      id: 7,
      project: 'p',
      applicant: 'bob',
      status,
      version,
      request: {} as any,
      rule: { level: 'L3', reviewers: 2, offices: [] },
      reviews: reviews.map(([reviewer, v]) => ({
        reviewer,
        office: 'data center',
        decision: 'approve' as const,
        comment: 'ok',
        version: v,
        ts: 0
      })),
      needs: null
    }) as IApplicationInfo;

  it('lets a steward review a pending application once per version', () => {
    expect(reviewBlocked(app('pending', []), me)).toBeNull();
    expect(reviewBlocked(app('pending', [['dan', 1]]), me)).toBeNull();
    expect(reviewBlocked(app('pending', [['carol', 1]]), me)).toContain(
      'already reviewed'
    );
    // a changed application needs a new review, also from carol
    expect(reviewBlocked(app('pending', [['carol', 1]], 2), me)).toBeNull();
  });

  it('blocks a decided application, whoever is signed in', () => {
    expect(reviewBlocked(app('approved', []), me)).toContain('approved');
    expect(reviewBlocked(app('rejected', []), null)).toContain('rejected');
    expect(reviewBlocked(app('pending', [['carol', 1]]), null)).toBeNull();
  });
});
