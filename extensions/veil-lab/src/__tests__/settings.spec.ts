import { BudgetModel, toLowFraction } from '../budgetModel';
import { DEFAULT_POLL_MS, MIN_POLL_MS, readSettings } from '../settings';

describe('readSettings', () => {
  it('has the schema defaults', () => {
    expect(readSettings(null)).toEqual({
      pollInterval: DEFAULT_POLL_MS,
      lowBudgetFraction: 0.2
    });
    expect(DEFAULT_POLL_MS).toBe(30000);
  });

  it('reads the poll interval and threshold, within bounds', () => {
    expect(
      readSettings({ pollInterval: 60000, lowBudgetFraction: 0.5 })
    ).toEqual({ pollInterval: 60000, lowBudgetFraction: 0.5 });
    expect(readSettings({ pollInterval: 0 }).pollInterval).toBe(0);
    expect(readSettings({ pollInterval: 10 }).pollInterval).toBe(MIN_POLL_MS);
    expect(readSettings({ pollInterval: -5 }).pollInterval).toBe(
      DEFAULT_POLL_MS
    );
    expect(readSettings({ lowBudgetFraction: 3 }).lowBudgetFraction).toBe(1);
    expect(readSettings({ lowBudgetFraction: 'x' }).lowBudgetFraction).toBe(
      0.2
    );
    expect(toLowFraction(-1)).toBe(0.2);
  });
});

describe('the warning threshold applies live', () => {
  it('re-evaluates which grants are low when it changes', () => {
    const model = new BudgetModel();
    model.update({
      project: 'p',
      sites: {
        north: {
          status: 'ok',
          grants: [
            {
              dataset: 'patients',
              epsilon: 10,
              epsilon_spent: 6,
              largest_next_epsilon: 3,
              status: 'active',
              expires_at: null
            }
          ]
        }
      }
    });
    expect(model.low).toBe(false); // 3 >= 20% of 10
    let changed = 0;
    model.changed.connect(() => changed++);
    model.lowFraction = 0.5;
    expect(model.low).toBe(true); // 3 < 50% of 10
    expect(model.tooltip).toContain('(low)');
    expect(changed).toBe(1);
    model.lowFraction = 0.5;
    expect(changed).toBe(1);
    model.lowFraction = 0.2;
    expect(model.low).toBe(false);
  });
});
