import type { IAuditEntry } from '../api';
import { appendPage, auditQuery, formatCost, NO_FILTERS } from '../auditModel';

function entry(seq: number, cost: number | null = 0): IAuditEntry {
  return {
    seq,
    ts: '2026-01-01T00:00:00+00:00',
    principal: 'alice',
    role: 'researcher',
    action: 'query',
    decision: 'released',
    project: 'p1',
    dataset: 'encounters',
    epsilon: 0,
    rho: 0.01,
    delta: 0,
    reason: null,
    hash: 'ab'.repeat(32),
    epsilon_at_reporting_delta: cost
  };
}

describe('auditQuery', () => {
  it('sends the site, the non-empty filters and the paging', () => {
    const q = auditQuery(
      'north & co',
      { ...NO_FILTERS, project: ' p1 ', decision: 'released' },
      { limit: 100, before: 42, format: undefined }
    );
    const params = new URLSearchParams(q);
    expect(params.get('site')).toBe('north & co');
    expect(params.get('project')).toBe('p1');
    expect(params.get('decision')).toBe('released');
    expect(params.has('dataset')).toBe(false);
    expect(params.has('format')).toBe(false);
    expect(params.get('before')).toBe('42');
    expect(params.get('limit')).toBe('100');
  });
});

describe('appendPage', () => {
  it('adds older entries once, newest first', () => {
    const shown = [entry(9), entry(8)];
    expect(appendPage(shown, [entry(8), entry(7)]).map(e => e.seq)).toEqual([
      9, 8, 7
    ]);
    expect(appendPage([], [entry(3)]).map(e => e.seq)).toEqual([3]);
  });
});

describe('formatCost', () => {
  it("shows the site's figure rounded up, never summed or understated", () => {
    expect(formatCost(entry(1, 0))).toBe('0');
    expect(formatCost(entry(1, null))).toBe('');
    expect(formatCost(entry(1, 0.30000001))).toBe('0.3');
    expect(formatCost(entry(1, 0.3001))).toBe('0.301');
    expect(formatCost(entry(1, 0.3))).toBe('0.3');
    expect(formatCost(entry(1, 1.23456))).toBe('1.24');
    expect(formatCost(entry(1, 12.001))).toBe('12.1');
  });
});
