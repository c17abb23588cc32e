import type { IBudgetEvent, IBudgetResponse } from '../api';
import { BudgetModel, formatEpsilon, isGrantLow } from '../budgetModel';

function grant(
  dataset: string,
  epsilon: number,
  remaining: number,
  status = 'active'
) {
  return {
    dataset,
    epsilon,
    epsilon_spent: epsilon - remaining,
    epsilon_remaining: remaining,
    status: status as 'active' | 'revoked' | 'expired',
    expires_at: null
  };
}

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
  it('summarizes remaining epsilon per site in server order', () => {
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
    expect(model.text).toBe('Veil ε north 3.20 · central 4.00 · valley 1.10');
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
    // Remaining is summed over active grants.
    expect(model.site('north')!.remaining).toBeCloseTo(3.6);
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
    expect(model.applyRelease(release({ cost: { epsilon: 2.7 } }))).toBe(true);
    expect(emitted).toBe(1);
    const north = model.site('north')!;
    expect(north.remaining).toBeCloseTo(0.5);
    expect(north.grants[0].epsilon_spent).toBeCloseTo(3.5);
    // 0.5 < 0.2 * 4: the release pushed the grant under the threshold.
    expect(model.low).toBe(true);
    expect(model.text).toBe('Veil ε north 0.5 · central 4.00 · valley 1.10');
  });

  it('ignores mock releases and unknown sites or datasets', () => {
    const model = new BudgetModel();
    model.update(healthy);
    expect(model.applyRelease(release({ mock: true }))).toBe(false);
    expect(model.applyRelease(release({ site: 'elsewhere' }))).toBe(false);
    expect(model.applyRelease(release({ dataset: 'notes' }))).toBe(false);
    expect(model.site('north')!.remaining).toBeCloseTo(3.2);
  });

  it('never shows negative remaining budget', () => {
    const model = new BudgetModel();
    model.update(healthy);
    model.applyRelease(release({ cost: { epsilon: 10 } }));
    expect(model.site('north')!.remaining).toBe(0);
  });

  it('does not mutate the response it was given', () => {
    const model = new BudgetModel();
    const json = JSON.parse(JSON.stringify(healthy)) as IBudgetResponse;
    model.update(json);
    model.applyRelease(release());
    const north = json.sites.north as {
      grants: { epsilon_remaining: number }[];
    };
    expect(north.grants[0].epsilon_remaining).toBe(3.2);
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
