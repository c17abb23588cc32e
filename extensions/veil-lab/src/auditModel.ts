/**
 * The steward desk's audit log: query strings for a filtered page or an
 * export, and how a cost is shown.
 */
import type { IAuditEntry } from './api';

export const AUDIT_FILTERS = [
  'project',
  'dataset',
  'action',
  'decision'
] as const;

export type AuditFilter = (typeof AUDIT_FILTERS)[number];
export type AuditFilters = Record<AuditFilter, string>;

/** Entries a page holds (the executor allows up to 1000). */
export const AUDIT_PAGE = 100;

export const NO_FILTERS: AuditFilters = {
  project: '',
  dataset: '',
  action: '',
  decision: ''
};

/** The query string for a site's log: non-empty filters, then `extra`. */
export function auditQuery(
  site: string,
  filters: AuditFilters,
  extra: Record<string, string | number | undefined> = {}
): string {
  const params = new URLSearchParams({ site });
  for (const key of AUDIT_FILTERS) {
    const value = filters[key].trim();
    if (value) {
      params.set(key, value);
    }
  }
  for (const [key, value] of Object.entries(extra)) {
    if (value !== undefined) {
      params.set(key, String(value));
    }
  }
  return params.toString();
}

/** Add an older page to the entries shown, newest first, none twice. */
export function appendPage(
  shown: IAuditEntry[],
  older: IAuditEntry[]
): IAuditEntry[] {
  const last = shown.length ? shown[shown.length - 1].seq : Infinity;
  return shown.concat(older.filter(e => e.seq < last));
}

/**
 * An entry's cost as the site computed it (epsilon at its reporting delta),
 * rounded up to three significant digits so that no cost is understated;
 * '' where the site did not compute it.
 */
export function formatCost(entry: IAuditEntry): string {
  const value = entry.epsilon_at_reporting_delta;
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return '';
  }
  if (value <= 0) {
    return '0';
  }
  const step = 10 ** (Math.floor(Math.log10(value)) - 2);
  // a relative 1e-6 of float noise is not rounded up (0.3000000001 shows 0.3)
  return String(Number((Math.ceil(value / step - 1e-4) * step).toPrecision(3)));
}
