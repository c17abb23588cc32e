/**
 * BudgetModel: the researcher's privacy budget per site, built from
 * `GET /veil/api/budget`. Plain TypeScript, no DOM, so it can be unit-tested.
 *
 * Budgets compose in zCDP (rho adds up exactly) and are read in epsilon at the
 * site's reporting delta, under three names: granted (`epsilon`), spent
 * (`epsilon_spent`) and the largest next release (`largest_next_epsilon`, the
 * epsilon of the rho left). Epsilons do not add up, so granted minus spent is
 * not the largest next release, and no figure here is computed that way.
 */
import { ISignal, Signal } from '@lumino/signaling';

import type {
  IApplicationInfo,
  IWhoAmI,
  IBudgetEvent,
  IBudgetResponse,
  IExistingGrant,
  IGrant,
  IRelease
} from './api';

/** Fraction of a grant under which the status bar turns to a warning. */
export const LOW_BUDGET_FRACTION = 0.2;

/** Why spent plus the largest next release is more than granted. */
export const NEXT_RELEASE_NOTE =
  'Largest next release: the most epsilon one more release may have. ' +
  'Epsilons of several releases do not add up (rho does), so it can be ' +
  'more than granted minus spent.';

/** The budget state of one site. */
export interface ISiteBudget {
  site: string;
  reachable: boolean;
  /** Error text when the site is unreachable. */
  error: string | null;
  grants: IGrant[];
  /**
   * The largest epsilon one more release at this site could have whichever
   * dataset it is on: the least `largest_next_epsilon` among the site's active
   * grants (a release is on one dataset, so these are never added up); 0
   * without an active grant. Each grant's own figure is in the tooltip.
   */
  largestNext: number;
  /** True when an active grant's largest next release is under the warning threshold (default 20%) of what it granted. */
  low: boolean;
}

/** Is this grant active and below the warning threshold? */
export function isGrantLow(
  grant: IGrant,
  fraction: number = LOW_BUDGET_FRACTION
): boolean {
  if (grant.status !== 'active' || !(grant.epsilon > 0)) {
    return false;
  }
  return grant.largest_next_epsilon < fraction * grant.epsilon;
}

/** Format an epsilon for people: one decimal above 1, two digits below. */
export function formatEpsilon(value: number): string {
  if (!Number.isFinite(value)) {
    return '–';
  }
  const v = Math.max(0, value);
  if (v === 0) {
    return '0';
  }
  if (v >= 1) {
    // two decimals, rounded down: a small release moves the figure, and none is overstated
    return (Math.floor(v * 100) / 100).toFixed(2);
  }
  return String(Number(v.toPrecision(2)));
}

/** A warning threshold from the settings: a fraction in [0, 1], else the default. */
export function toLowFraction(value: unknown): number {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0
    ? Math.min(value, 1)
    : LOW_BUDGET_FRACTION;
}

export class BudgetModel {
  /** The fraction of a grant under which its largest next release is shown as low. */
  get lowFraction(): number {
    return this._lowFraction;
  }

  /** Change the warning threshold (from the settings); applies at once. */
  set lowFraction(value: number) {
    const fraction = toLowFraction(value);
    if (fraction === this._lowFraction) {
      return;
    }
    this._lowFraction = fraction;
    for (const s of this.sites) {
      if (s.reachable) {
        this._sites.set(s.site, this._summarize(s.site, s.grants));
      }
    }
    this._changed.emit();
  }

  /** Emitted whenever the state changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The active project, or null before the first successful fetch. */
  get project(): string | null {
    return this._project;
  }

  /** Per-site budgets in the order the server listed them. */
  get sites(): ISiteBudget[] {
    return [...this._sites.values()];
  }

  /** A site's budget, or undefined when the server did not list it. */
  site(name: string): ISiteBudget | undefined {
    return this._sites.get(name);
  }

  /** The error of the last request (network or server), if it failed. */
  get requestError(): string | null {
    return this._requestError;
  }

  /** True once a response or an error has been received. */
  get loaded(): boolean {
    return this._loaded;
  }

  /** Any active grant at any reachable site below the warning threshold of its epsilon. */
  get low(): boolean {
    return this.sites.some(s => s.low);
  }

  /** Names of sites that could not be reached. */
  get unreachableSites(): string[] {
    return this.sites.filter(s => !s.reachable).map(s => s.site);
  }

  /** True when the request failed or any site is unreachable. */
  get hasError(): boolean {
    return this._requestError !== null || this.unreachableSites.length > 0;
  }

  /**
   * One-line text for the status bar: the largest next release per site; with
   * one site and one active grant, also what was granted and spent.
   */
  get text(): string {
    if (this._requestError !== null) {
      return 'Veil: budget unavailable';
    }
    const unreachable = this.unreachableSites;
    if (unreachable.length > 0) {
      return `Veil: ${unreachable.join(', ')} unreachable`;
    }
    if (!this._loaded) {
      return 'Veil ε …';
    }
    if (this._sites.size === 0) {
      return 'Veil ε (no sites)';
    }
    const sites = this.sites;
    const active = sites.map(s => s.grants.filter(g => g.status === 'active'));
    if (sites.length === 1 && active[0].length === 1) {
      const g = active[0][0];
      return (
        `Veil ${sites[0].site}: ε ${formatEpsilon(g.largest_next_epsilon)} for the next release ` +
        `(granted ${formatEpsilon(g.epsilon)}, spent ${formatEpsilon(g.epsilon_spent)})`
      );
    }
    const parts = sites.map(
      (s, i) =>
        `${s.site} ${active[i].length > 0 ? formatEpsilon(s.largestNext) : '–'}`
    );
    return `Veil ε for the next release: ${parts.join(' · ')}`;
  }

  /** Multi-line tooltip: one line per grant (granted, spent, largest next release). */
  get tooltip(): string {
    const lines: string[] = [];
    if (this._project) {
      lines.push(`Project: ${this._project}`);
    }
    if (this._requestError !== null) {
      lines.push(`Budget request failed: ${this._requestError}`);
    }
    for (const s of this.sites) {
      if (!s.reachable) {
        lines.push(`${s.site}: unreachable (${s.error ?? 'no detail'})`);
        continue;
      }
      if (s.grants.length === 0) {
        lines.push(`${s.site}: no grants`);
      }
      for (const g of s.grants) {
        const warn = isGrantLow(g, this._lowFraction) ? ' (low)' : '';
        const status = g.status === 'active' ? '' : ` [${g.status}]`;
        lines.push(
          `${s.site}/${g.dataset}: ε granted ${formatEpsilon(g.epsilon)}, ` +
            `spent ${formatEpsilon(g.epsilon_spent)}, ` +
            `largest next release ${formatEpsilon(g.largest_next_epsilon)}${warn}${status}`
        );
      }
    }
    if (this.sites.some(s => s.grants.length > 0)) {
      lines.push(NEXT_RELEASE_NOTE);
    }
    return lines.join('\n');
  }

  /** Replace the state with a fresh `/veil/api/budget` response. */
  update(json: IBudgetResponse): void {
    this._project = typeof json.project === 'string' ? json.project : null;
    this._requestError = null;
    this._loaded = true;
    this._sites.clear();
    const sites = json.sites ?? {};
    for (const name of Object.keys(sites)) {
      const entry = sites[name];
      if (!entry || entry.status !== 'ok') {
        this._sites.set(name, {
          site: name,
          reachable: false,
          error:
            entry && 'error' in entry ? String(entry.error) : 'unknown error',
          grants: [],
          largestNext: 0,
          low: false
        });
        continue;
      }
      const grants = (entry.grants ?? []).map(g => ({ ...g }));
      this._sites.set(name, this._summarize(name, grants));
    }
    this._changed.emit();
  }

  /** Record that the budget request itself failed (keeps the last state). */
  setError(message: string): void {
    this._requestError = message;
    this._loaded = true;
    this._changed.emit();
  }

  /**
   * Apply a live (zCDP) release until the refetch that follows it: the
   * matching active grant is charged `cost.rho` exactly. Its epsilons cannot be
   * recomputed here (the site converts with OpenDP), and epsilons do not add
   * up, so until the site's own figures arrive the largest next release is a
   * lower bound and spent an upper bound: the epsilon of rho is concave and 0
   * at 0, so the epsilon of `rho_remaining - rho` is at least both
   * `largest_next_epsilon - cost.epsilon` and `largest_next_epsilon` scaled by
   * the rho left, and the epsilon spent grows by at most `cost.epsilon`.
   * Mock releases spend nothing. When the event carries `grant` (the site's
   * figures just after the release) those are taken as they are.
   *
   * @returns true when a grant was charged
   */
  applyRelease(event: IBudgetEvent | IRelease): boolean {
    if (event.mock) {
      return false;
    }
    const site = this._sites.get(event.site);
    const epsilon = Number(event.cost?.epsilon);
    const rho = Number(event.cost?.rho);
    if (!site || !site.reachable || !Number.isFinite(epsilon)) {
      return false;
    }
    const grant = site.grants.find(
      g => g.dataset === event.dataset && g.status === 'active'
    );
    if (!grant) {
      return false;
    }
    const after = event.grant;
    if (
      after &&
      typeof after.largest_next_epsilon === 'number' &&
      typeof after.epsilon_spent === 'number'
    ) {
      // The site's own figures for the grant just after this release: exact.
      grant.largest_next_epsilon = after.largest_next_epsilon;
      grant.epsilon_spent = after.epsilon_spent;
      if (typeof after.epsilon_granted === 'number') {
        grant.epsilon = after.epsilon_granted;
      }
      if (typeof after.rho === 'number') {
        grant.rho_remaining = after.rho;
      }
      if (typeof after.rho_granted === 'number') {
        grant.rho_total = after.rho_granted;
        if (typeof after.rho === 'number') {
          grant.rho_spent = Math.max(0, after.rho_granted - after.rho);
        }
      }
      this._sites.set(site.site, this._summarize(site.site, site.grants));
      this._changed.emit();
      return true;
    }
    const before = grant.largest_next_epsilon;
    let next = Math.max(0, before - epsilon);
    const rhoLeft = grant.rho_remaining;
    if (Number.isFinite(rho) && rho >= 0 && rhoLeft !== undefined) {
      const after = Math.max(0, rhoLeft - rho);
      if (rhoLeft > 0) {
        next = Math.max(next, (before * after) / rhoLeft);
      }
      if (after === 0) {
        next = 0;
      }
      grant.rho_remaining = after;
      grant.rho_spent = (grant.rho_spent ?? 0) + rho;
    }
    grant.largest_next_epsilon = next;
    grant.epsilon_spent += epsilon;
    this._sites.set(site.site, this._summarize(site.site, site.grants));
    this._changed.emit();
    return true;
  }

  private _summarize(site: string, grants: IGrant[]): ISiteBudget {
    const active = grants.filter(g => g.status === 'active');
    return {
      site,
      reachable: true,
      error: null,
      grants,
      largestNext:
        active.length === 0
          ? 0
          : Math.min(...active.map(g => g.largest_next_epsilon)),
      low: active.some(g => isGrantLow(g, this._lowFraction))
    };
  }

  private _changed = new Signal<this, void>(this);
  private _lowFraction = LOW_BUDGET_FRACTION;
  private _project: string | null = null;
  private _requestError: string | null = null;
  private _loaded = false;
  private _sites = new Map<string, ISiteBudget>();
}

/** A grant as the card shows it: granted, spent, largest next release, expiry. */
export function describeGrant(g: IExistingGrant): string {
  const until = g.expires_at
    ? `expires ${String(g.expires_at).slice(0, 10)}`
    : 'no expiry';
  return (
    `grant ${g.id} on ${g.dataset}: ε granted ${formatEpsilon(g.epsilon)}, ` +
    `spent ${formatEpsilon(g.epsilon_spent)}, largest next release ` +
    `${formatEpsilon(g.largest_next_epsilon)}, ${until}`
  );
}

/** The grants an approval must say what to do with: another application's. */
export function grantsToDecide(app: IApplicationInfo): IExistingGrant[] {
  return (app.existing_grants ?? []).filter(
    g =>
      g.status === 'active' &&
      (g.application_id === null || String(g.application_id) !== String(app.id))
  );
}

/**
 * Why this steward cannot review the application now (null: they can): it is
 * decided, or they already reviewed this version of it.
 */
export function reviewBlocked(
  app: IApplicationInfo,
  me: IWhoAmI | null | undefined
): string | null {
  if (app.status !== 'pending') {
    return `This application is ${app.status}.`;
  }
  if (
    me &&
    (app.reviews ?? []).some(
      r => r.reviewer === me.principal && r.version === app.version
    )
  ) {
    return `You (${me.principal}) already reviewed version ${app.version}; another steward must review it.`;
  }
  return null;
}
