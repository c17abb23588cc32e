/**
 * What the standing queries panel shows, from GET /veil/api/standing: each site's standing queries
 * with their progress, next release and up-front budget. Plain TypeScript, no DOM, so it can be
 * unit-tested.
 */
import { IStandingInfo, IStandingQuery, IStandingResponse } from './api';
import { formatEpsilon } from './budgetModel';
import { formatSmall } from './releaseHistory';

const DAY_MS = 86_400_000;

/** A site's part of the panel: its standing queries, or why it gave none. */
export interface ISiteStanding {
  site: string;
  queries: IStandingInfo[];
  /** Set when the site was unreachable or refused: the line to show instead. */
  error: string | null;
}

/** The sites in name order, each with its standing queries (oldest first, as the site lists them). */
export function siteStanding(response: IStandingResponse): ISiteStanding[] {
  return Object.keys(response.sites ?? {})
    .sort()
    .map(site => {
      const entry = response.sites[site];
      return entry.status === 'ok'
        ? { site, queries: entry.standing ?? [], error: null }
        : {
            site,
            queries: [],
            error: `${site} ${entry.status}: ${entry.error}`
          };
    });
}

/** Whether no reachable site has a standing query of the project (then the panel says how to set one up). */
export function noStandingQueries(sites: ISiteStanding[]): boolean {
  return sites.every(s => s.queries.length === 0);
}

/** The ISO date `days` after an ISO date (UTC calendar days). */
export function addDays(isoDate: string, days: number): string {
  const t = Date.parse(`${isoDate.slice(0, 10)}T00:00:00Z`) + days * DAY_MS;
  return new Date(t).toISOString().slice(0, 10);
}

/** A window's first and last day (both counted; ISO dates). */
export interface IWindowSpan {
  window: number;
  first: string;
  last: string;
}

/** The days window `w` (0-based) counts. */
export function windowSpan(spec: IStandingQuery, w: number): IWindowSpan {
  return {
    window: w,
    first: addDays(spec.start, w * spec.window_days),
    last: addDays(spec.start, (w + 1) * spec.window_days - 1)
  };
}

/** The last window released so far, or null before the first. */
export function lastReleased(info: IStandingInfo): IWindowSpan | null {
  return info.windows_released > 0
    ? windowSpan(info.spec, info.windows_released - 1)
    : null;
}

/** "window 3 (2026-01-15 to 2026-01-21)", or "none yet". */
export function describeLastReleased(info: IStandingInfo): string {
  const span = lastReleased(info);
  if (!span) {
    return 'none yet';
  }
  const days =
    span.first === span.last ? span.first : `${span.first} to ${span.last}`;
  return `window ${span.window + 1} (${days})`;
}

/** "3 / 52 windows". */
export function describeProgress(info: IStandingInfo): string {
  return `${info.windows_released} / ${info.spec.horizon} windows`;
}

/** How long until `target`, for people: "in 3 days", "in 5 h", "in 12 min", or "due now" once past. */
export function relativeTime(target: Date, now: Date): string {
  const ms = target.getTime() - now.getTime();
  if (!Number.isFinite(ms)) {
    return '';
  }
  if (ms <= 0) {
    return 'due now';
  }
  const minutes = Math.ceil(ms / 60_000);
  if (minutes < 60) {
    return `in ${minutes} min`;
  }
  const hours = Math.floor(minutes / 60);
  if (hours < 48) {
    return `in ${hours} h`;
  }
  return `in ${Math.floor(hours / 24)} days`;
}

/** "2026-01-29 00:00 UTC" (the sites release at UTC midnight). */
export function formatUtc(date: Date): string {
  if (Number.isNaN(date.getTime())) {
    return '';
  }
  const iso = date.toISOString();
  return `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
}

/** The next release: when, relative and absolute, or what the standing query's status says instead. */
export interface INextRelease {
  /** "in 3 days", "due now", or "finished" / "stopped" */
  relative: string;
  /** "2026-01-29 00:00 UTC" ('' when there is none) */
  absolute: string;
  /** The window it releases (1-based, as people count), or null. */
  window: number | null;
}

/** When the next window is released. A window past its time is "due now": the site releases it at its
 * next check (or once its dataset is active again). */
export function nextRelease(info: IStandingInfo, now: Date): INextRelease {
  if (
    info.status !== 'active' ||
    info.next_release_at === null ||
    info.next_window === null
  ) {
    return {
      relative: info.status === 'active' ? 'finished' : info.status,
      absolute: '',
      window: null
    };
  }
  const at = new Date(info.next_release_at);
  return {
    relative: relativeTime(at, now),
    absolute: formatUtc(at),
    window: info.next_window + 1
  };
}

/** The budget as the panel shows it: epsilon at the site's reporting delta. */
export function describeBudget(info: IStandingInfo): string {
  return `ε ${formatEpsilon(info.epsilon)}`;
}

/** The budget's one-line tooltip: charged once, up front, for the whole horizon. */
export function budgetTooltip(info: IStandingInfo): string {
  return (
    `ε ${formatEpsilon(info.epsilon)} at δ ${info.delta.toExponential()}, the site's reporting δ (ρ ${formatSmall(info.rho)}), ` +
    `charged once, up front, for all ${info.spec.horizon} windows: releasing them costs nothing more`
  );
}

/** The status line: "active", "finished", or "stopped: <reason>". */
export function describeStatus(info: IStandingInfo): string {
  return info.status_reason
    ? `${info.status}: ${info.status_reason}`
    : info.status;
}

/** The call that sets one up, shown by the empty panel. */
export const SETUP_HINT =
  "study.standing(name, sql, time_column, start, epsilon=..., max_windows=..., purpose='...')";
