/**
 * ReleaseHistory: the live DP releases of one notebook, read from its cell
 * outputs (`output.metadata.veil.releases`) and from kernel comm events.
 * Plain TypeScript, no DOM, so it can be unit-tested.
 */
import { ISignal, Signal } from '@lumino/signaling';

import type { IRelease, IReleaseCost, IVerifyResult } from './api';

/** Verification state of a receipt. */
export interface IVerification {
  ok: boolean;
  detail: string;
}

/** Totals of the releases at one site. */
export interface ISiteTotal {
  site: string;
  count: number;
  epsilon: number;
}

/** Minimal notebook JSON shape this module reads (nbformat 4). */
export interface INotebookLike {
  cells?: ReadonlyArray<{
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
  return {
    site,
    dataset: typeof dataset === 'string' ? dataset : '',
    query: typeof query === 'string' ? query : '',
    cost,
    receipt,
    mock: mock === true
  };
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
   * Merge the live releases found in a notebook's JSON. Releases already
   * known (by receipt) are kept; nothing is removed, since a comm event may
   * arrive before its output is saved.
   *
   * @returns the number of new releases
   */
  loadNotebook(nb: INotebookLike): number {
    let added = 0;
    for (const release of releasesFromNotebook(nb)) {
      if (release.mock || this._releases.has(release.receipt)) {
        continue;
      }
      this._releases.set(release.receipt, release);
      added++;
    }
    if (added > 0) {
      this._changed.emit();
    }
    return added;
  }

  /** Totals (count, epsilon) per site, in first-seen order. */
  totals(): ISiteTotal[] {
    const map = new Map<string, ISiteTotal>();
    for (const r of this._releases.values()) {
      const t = map.get(r.site) ?? { site: r.site, count: 0, epsilon: 0 };
      t.count += 1;
      t.epsilon += r.cost.epsilon;
      map.set(r.site, t);
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
    this._changed.emit();
  }

  private _changed = new Signal<this, void>(this);
  private _releases = new Map<string, IRelease>();
  private _verified = new Map<string, IVerification>();
}
