/**
 * ReleaseHistory: the live DP releases of one notebook, read from its
 * metadata (`metadata.veil.releases`: every release the kernel announced,
 * displayed or not), from its cell outputs (`output.metadata.veil.releases`)
 * and from kernel comm events, one per receipt.
 * Plain TypeScript, no DOM, so it can be unit-tested.
 */
import { ISignal, Signal } from '@lumino/signaling';

import type {
  IRelease,
  IReleaseCost,
  IReleaseGrant,
  IVerifyResult,
  VeilMode
} from './api';
import { formatEpsilon } from './budgetModel';

/** The sentence shown wherever per-release epsilons and grant figures appear together. */
export const ZCDP_NOTE =
  'Releases compose in rho (zCDP): their epsilons do not add up; the site ' +
  'converts the total rho to epsilon at its reporting delta.';

/** Verification state of a receipt. */
export interface IVerification {
  ok: boolean;
  detail: string;
}

/** The state of one grant (site, dataset) after the latest release on it. */
export interface IGrantState {
  site: string;
  dataset: string;
  /** Live releases on this dataset at this site in the history. */
  count: number;
  /** The grant after the latest of them that carried one (null: an older kernel or executor). */
  grant: IReleaseGrant | null;
  /** Receipt of the release that grant is from. */
  receipt: string | null;
}

/** Where a release is shown: the cell whose output holds it. */
export interface ICellLocation {
  /** The cell's index in the notebook when it was read. */
  index: number;
  /** The cell's id (nbformat 4.5), when it has one. */
  id: string | null;
}

/** Minimal notebook JSON shape this module reads (nbformat 4). */
export interface INotebookLike {
  metadata?: unknown;
  cells?: ReadonlyArray<{
    id?: string;
    cell_type?: string;
    outputs?: ReadonlyArray<{ metadata?: unknown } | null | undefined>;
  }>;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Validate one release entry; returns null when it is malformed. */
export function parseRelease(value: unknown): IRelease | null {
  if (!isRecord(value)) {
    return null;
  }
  const { site, dataset, query, receipt, mock } = value;
  if (typeof site !== 'string' || typeof receipt !== 'string' || !receipt) {
    return null;
  }
  const costIn = isRecord(value.cost) ? value.cost : {};
  const num = (v: unknown): number | undefined =>
    typeof v === 'number' && Number.isFinite(v) ? v : undefined;
  const cost: IReleaseCost = { epsilon: num(costIn.epsilon) ?? 0 };
  for (const key of ['rho', 'delta', 'epsilon_delta'] as const) {
    const v = num(costIn[key]);
    if (v !== undefined) {
      cost[key] = v;
    }
  }
  const release: IRelease = {
    site,
    dataset: typeof dataset === 'string' ? dataset : '',
    query: typeof query === 'string' ? query : '',
    cost,
    receipt,
    mock: mock === true
  };
  const grant = parseGrant(value.grant);
  if (grant) {
    release.grant = grant;
  }
  return release;
}

const GRANT_KEYS = [
  'epsilon_granted',
  'epsilon_spent',
  'largest_next_epsilon',
  'rho_granted',
  'rho',
  'delta'
] as const;

/** The numeric figures of a release's `grant`; null when it has none. */
export function parseGrant(value: unknown): IReleaseGrant | null {
  if (!isRecord(value)) {
    return null;
  }
  const grant: IReleaseGrant = {};
  let any = false;
  for (const key of GRANT_KEYS) {
    const v = value[key];
    if (typeof v === 'number' && Number.isFinite(v)) {
      grant[key] = v;
      any = true;
    }
  }
  return any ? grant : null;
}

/** A release as the notebook's metadata keeps it (no comm `type`, plain JSON). */
export function releaseRecord(release: IRelease): Record<string, unknown> {
  const record: Record<string, unknown> = {
    site: release.site,
    dataset: release.dataset,
    query: release.query,
    cost: { ...release.cost },
    receipt: release.receipt,
    mock: release.mock
  };
  if (release.grant) {
    record.grant = { ...release.grant };
  }
  return record;
}

/**
 * The notebook's `metadata.veil` with a live release appended to its
 * `releases` (so that a release assigned to a variable, never displayed, is
 * still in the history after a reload); null when it is already there, mock
 * or malformed.
 */
export function withRelease(
  veilMetadata: unknown,
  release: IRelease
): Record<string, unknown> | null {
  const parsed = parseRelease(release);
  if (!parsed || parsed.mock) {
    return null;
  }
  const veil = isRecord(veilMetadata) ? veilMetadata : {};
  const list = Array.isArray(veil.releases) ? veil.releases : [];
  if (list.some(r => isRecord(r) && r.receipt === parsed.receipt)) {
    return null;
  }
  return { ...veil, releases: [...list, releaseRecord(parsed)] };
}

/** Releases recorded in a notebook's own metadata (`metadata.veil.releases`). */
export function releasesFromNotebookMetadata(metadata: unknown): IRelease[] {
  return releasesFromOutputMetadata(metadata);
}

/** Releases recorded in one output's metadata (`metadata.veil.releases`). */
export function releasesFromOutputMetadata(metadata: unknown): IRelease[] {
  if (!isRecord(metadata) || !isRecord(metadata.veil)) {
    return [];
  }
  const list = metadata.veil.releases;
  if (!Array.isArray(list)) {
    return [];
  }
  const out: IRelease[] = [];
  for (const item of list) {
    const release = parseRelease(item);
    if (release) {
      out.push(release);
    }
  }
  return out;
}

/** All releases (mock included) recorded in a notebook's outputs, in order. */
export function releasesFromNotebook(nb: INotebookLike): IRelease[] {
  const out: IRelease[] = [];
  for (const cell of nb.cells ?? []) {
    if (cell.cell_type !== undefined && cell.cell_type !== 'code') {
      continue;
    }
    for (const output of cell.outputs ?? []) {
      if (output) {
        out.push(...releasesFromOutputMetadata(output.metadata));
      }
    }
  }
  return out;
}

/** Short form of a receipt hash for display. */
export function shortReceipt(receipt: string, length = 12): string {
  return receipt.length > length ? `${receipt.slice(0, length)}…` : receipt;
}

export class ReleaseHistory {
  /** Emitted whenever releases or verifications change. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Live releases, oldest first, one per receipt. */
  get releases(): IRelease[] {
    return [...this._releases.values()];
  }

  get size(): number {
    return this._releases.size;
  }

  /**
   * Add a release (from the comm or an output). Mock releases and repeats of
   * a known receipt are ignored.
   *
   * @returns true when the release was new
   */
  add(release: IRelease): boolean {
    const parsed = parseRelease(release);
    if (!parsed || parsed.mock || this._releases.has(parsed.receipt)) {
      return false;
    }
    this._releases.set(parsed.receipt, parsed);
    this._changed.emit();
    return true;
  }

  /**
   * Merge the live releases found in a notebook's JSON: its metadata (every
   * release the kernel announced, in order) and its cells' outputs. Releases
   * already known (by receipt) are kept; nothing is removed, since a comm
   * event may arrive before its output is saved. Also notes which cell's
   * output holds each release.
   *
   * @returns the number of new releases
   */
  loadNotebook(nb: INotebookLike): number {
    let added = 0;
    const take = (release: IRelease) => {
      if (release.mock) {
        return;
      }
      const known = this._releases.get(release.receipt);
      if (!known) {
        this._releases.set(release.receipt, release);
        added++;
      } else if (!known.grant && release.grant) {
        known.grant = release.grant;
        added++;
      }
    };
    const meta = isRecord(nb.metadata) ? nb.metadata : {};
    releasesFromNotebookMetadata(meta).forEach(take);
    const cells = new Map<string, ICellLocation>();
    (nb.cells ?? []).forEach((cell, index) => {
      if (cell.cell_type !== undefined && cell.cell_type !== 'code') {
        return;
      }
      for (const output of cell.outputs ?? []) {
        for (const release of output
          ? releasesFromOutputMetadata(output.metadata)
          : []) {
          take(release);
          if (!release.mock && !cells.has(release.receipt)) {
            cells.set(release.receipt, {
              index,
              id: typeof cell.id === 'string' ? cell.id : null
            });
          }
        }
      }
    });
    const moved =
      cells.size !== this._cells.size ||
      [...cells].some(([k, v]) => {
        const old = this._cells.get(k);
        return !old || old.index !== v.index || old.id !== v.id;
      });
    this._cells = cells;
    if (added > 0 || moved) {
      this._changed.emit();
    }
    return added;
  }

  /** The cell whose output holds this release, as last read; undefined when no output does. */
  cellOf(receipt: string): ICellLocation | undefined {
    return this._cells.get(receipt);
  }

  /** How many of the live releases are held by the notebook's outputs. */
  get inOutputs(): number {
    return this._cells.size;
  }

  /**
   * Per (site, dataset), in first-seen order: how many releases, and the
   * grant after the latest one that carried the grant's figures. These are
   * the site's own figures (rho composes; epsilons do not add up), never a
   * sum of the releases' epsilons.
   */
  grantStates(): IGrantState[] {
    const map = new Map<string, IGrantState>();
    for (const r of this._releases.values()) {
      const key = `${r.site}\u0000${r.dataset}`;
      const state = map.get(key) ?? {
        site: r.site,
        dataset: r.dataset,
        count: 0,
        grant: null,
        receipt: null
      };
      state.count += 1;
      if (r.grant) {
        state.grant = r.grant;
        state.receipt = r.receipt;
      }
      map.set(key, state);
    }
    return [...map.values()];
  }

  /** Verification of a receipt, or undefined when not yet verified. */
  verification(receipt: string): IVerification | undefined {
    return this._verified.get(receipt);
  }

  /** Releases whose receipt has not been verified yet. */
  unverified(): IRelease[] {
    return this.releases.filter(r => !this._verified.has(r.receipt));
  }

  /** Record the results of `POST /veil/api/receipts/verify`. */
  setVerifications(results: IVerifyResult[]): void {
    let changed = false;
    for (const r of results) {
      if (this._releases.has(r.receipt)) {
        this._verified.set(r.receipt, { ok: r.ok === true, detail: r.detail });
        changed = true;
      }
    }
    if (changed) {
      this._changed.emit();
    }
  }

  clear(): void {
    this._releases.clear();
    this._verified.clear();
    this._cells.clear();
    this._changed.emit();
  }

  private _changed = new Signal<this, void>(this);
  private _cells = new Map<string, ICellLocation>();
  private _releases = new Map<string, IRelease>();
  private _verified = new Map<string, IVerification>();
}

/** A rho or delta for people: three significant digits. */
export function formatSmall(value: number | undefined): string {
  if (value === undefined || !Number.isFinite(value)) {
    return '–';
  }
  return value === 0 ? '0' : String(Number(value.toPrecision(3)));
}

/** An epsilon as the status bar and the desk show it (the same function). */
function eps(value: number | undefined): string {
  return value === undefined ? '–' : formatEpsilon(value);
}

/**
 * One release's cost: its epsilon at the reporting delta (`epsilon_delta`),
 * the delta it spends when it has one, and its rho.
 */
export function describeCost(cost: IReleaseCost): string {
  const at = cost.epsilon_delta ?? cost.delta;
  const delta = at !== undefined ? ` at δ ${formatSmall(at)}` : '';
  const spends =
    cost.delta && cost.epsilon_delta !== undefined
      ? `, δ spent ${formatSmall(cost.delta)}`
      : '';
  const rho = cost.rho !== undefined ? `, ρ ${formatSmall(cost.rho)}` : '';
  return `ε ${eps(cost.epsilon)}${delta}${spends}${rho}`;
}

/** The grant after a release: granted, spent and the largest next release, in epsilon. */
export function describeGrantState(
  grant: IReleaseGrant | null | undefined
): string {
  if (!grant) {
    return 'grant after it: not recorded (an older kernel or site)';
  }
  return (
    `granted ε ${eps(grant.epsilon_granted)} · spent ${eps(grant.epsilon_spent)} · ` +
    `largest next release ${eps(grant.largest_next_epsilon)}`
  );
}

/** The notice shown when live outputs meet a kernel in mock mode. */
export const LIVE_OUTPUTS_IN_MOCK =
  "This notebook's outputs hold live releases; the kernel is in MOCK mode now: " +
  're-running cells will not reproduce them (switch with %veil mode live).';

/** Should the notice show? Live releases in the outputs, and the kernel says mock. */
export function needsLiveNotice(
  mode: VeilMode | null,
  liveInOutputs: number
): boolean {
  return mode === 'mock' && liveInOutputs > 0;
}
