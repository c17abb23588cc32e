/**
 * The Veil server API contract (JSON shapes) and a small request helper.
 *
 * Every endpoint lives under `<baseUrl>/veil/api/` on the Jupyter server; the
 * Python server extension talks to the site executors on the lab's behalf.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Privacy cost of one release, as reported by the executor. */
export interface IReleaseCost {
  rho?: number;
  delta?: number;
  epsilon: number;
  epsilon_delta?: number;
}

/**
 * The project's grant on the release's dataset at its site just after the
 * release, computed by the site in the same transaction as the charge.
 */
export interface IReleaseGrant {
  epsilon_granted?: number;
  epsilon_spent?: number;
  largest_next_epsilon?: number;
  rho_granted?: number;
  /** rho left */
  rho?: number;
  /** delta left */
  delta?: number;
}

/** One DP release recorded in a notebook output or pushed over the comm. */
export interface IRelease {
  site: string;
  dataset: string;
  query: string;
  cost: IReleaseCost;
  receipt: string;
  mock: boolean;
  /** The grant after this release (absent in older notebooks). */
  grant?: IReleaseGrant;
}

/** Mock (local, spends nothing) or live (DP releases charged at the sites). */
export type VeilMode = 'mock' | 'live';

/** Message sent by the kernel after every live release. */
export interface IBudgetEvent extends IRelease {
  type: 'budget';
}

/** Message sent by the kernel when the `veil` comm opens. */
export interface IReadyEvent {
  type: 'ready';
  version: string;
  /** Name of the study loaded in the kernel, or null when none. */
  study: string | null;
  /** The kernel's mode (older kernels do not say: then mock, how every study starts). */
  mode?: VeilMode;
}

/** Message sent by the kernel whenever its mode changes. */
export interface IModeEvent {
  type: 'mode';
  mode: VeilMode;
}

export type KernelEvent = IBudgetEvent | IReadyEvent | IModeEvent;

/** A site that could not be reached by the server extension. */
export interface IUnreachable {
  status: 'unreachable';
  error: string;
}

export type GrantStatus = 'active' | 'revoked' | 'expired';

/**
 * A grant, as the site reports it. Budgets compose in zCDP (rho adds up);
 * people read them in epsilon at the site's reporting delta.
 */
export interface IGrant {
  dataset: string;
  /** Granted: the grant's whole budget, in epsilon. */
  epsilon: number;
  /** Spent: the epsilon of the rho spent so far. */
  epsilon_spent: number;
  /**
   * The largest epsilon one more release could have (epsilon of the remaining
   * rho at the reporting delta); epsilons of several releases do not add up:
   * rho does, so this is not `epsilon - epsilon_spent`.
   */
  largest_next_epsilon: number;
  /** Granted, spent and what one more release may still cost, in rho. */
  rho_total?: number;
  rho_spent?: number;
  rho_remaining?: number;
  status: GrantStatus;
  expires_at: string | null;
}

export interface ISiteBudgetOk {
  status: 'ok';
  grants: IGrant[];
}

/** GET /veil/api/budget */
export interface IBudgetResponse {
  project: string;
  sites: { [site: string]: ISiteBudgetOk | IUnreachable };
}

export type PrivacyLevel = 'L1' | 'L2' | 'L3';

export interface IColumnInfo {
  name: string;
  dtype: string;
  description: string;
  bounds: [number, number] | null;
  categories: unknown[] | null;
}

export interface IDatasetInfo {
  name: string;
  title: string;
  description: string;
  level: PrivacyLevel;
  privacy_unit: string;
  max_rows_per_unit: number | null;
  max_rows: number | null;
  columns: IColumnInfo[];
  /** open, controlled or enclave; absent from a site older than sharing models (then: controlled). */
  sharing?: string;
  /** draft, active, suspended, retired or destroyed; absent from a site older than lifecycles (then: active). */
  state?: string;
}

/** GET /veil/api/datasets */
export interface IDatasetsResponse {
  sites: {
    [site: string]: { status: 'ok'; datasets: IDatasetInfo[] } | IUnreachable;
  };
}

/** A standing count's spec (veil/wire.py StandingQuery). */
export interface IStandingQuery {
  /** The study-wide name, the same at every site. */
  name: string;
  sql: string;
  time_column: string;
  /** The first day of the first window (ISO date, UTC). */
  start: string;
  window_days: number;
  /** How many windows the standing count has. */
  horizon: number;
  /** The most (window, group) cells one patient is counted in over the horizon. */
  max_windows: number;
  /** Days after a window ends before it is released. */
  lag_days: number;
  confidence: number;
  /** The binary tree's levels (null: the full tree; 1: each window alone). */
  levels?: number | null;
}

export type StandingStatus = 'active' | 'finished' | 'stopped';

/** A standing query at a site (veil/wire.py StandingInfo): charged once, up front, released window by window. */
export interface IStandingInfo {
  id: number;
  project: string;
  dataset: string;
  application_id: number;
  spec: IStandingQuery;
  status: StandingStatus;
  status_reason: string | null;
  /** The whole horizon's loss, in epsilon at `delta`. */
  epsilon: number;
  /** The site's reporting delta, at which `epsilon` is stated. */
  delta: number;
  /** The whole horizon's loss in zCDP, charged to the dataset's cap at approval. */
  rho: number;
  levels: number;
  noise_scale: number;
  windows_released: number;
  /** The next window to release (0-based), null once finished or stopped. */
  next_window: number | null;
  /** When the next window is released (ISO, UTC). */
  next_release_at: string | null;
  created_at: string;
  /** The audit entry of the up-front charge. */
  receipt: string;
}

/** A site's answer in a per-site listing that it refused or could not give. */
export interface ISiteFailure {
  status: 'unreachable' | 'refused';
  error: string;
}

/** GET /veil/api/standing */
export interface IStandingResponse {
  project: string;
  sites: {
    [site: string]: { status: 'ok'; standing: IStandingInfo[] } | ISiteFailure;
  };
}

/** GET /veil/api/datasets/{site}/{name}/mock?rows=N */
export interface IMockResponse {
  columns: string[];
  rows: unknown[][];
}

/** POST /veil/api/receipts/verify */
export interface IVerifyResult {
  site: string;
  receipt: string;
  ok: boolean;
  detail: string;
}

export interface IVerifyResponse {
  results: IVerifyResult[];
}

/** GET /veil/api/steward */
export interface IStewardInfo {
  enabled: boolean;
  sites: string[];
}

/** The steward as a site knows them (from the steward config's token). */
export interface IWhoAmI {
  principal: string;
  role: string;
  project: string | null;
  office?: string | null;
}

/** GET /veil/api/steward/whoami */
export interface IWhoAmIResponse {
  sites: {
    [site: string]:
      | { status: 'ok'; whoami: IWhoAmI }
      | { status: 'unreachable' | 'refused'; error: string };
  };
}

export interface IApplicationRequest {
  purpose: string;
  datasets: string[];
  epsilon: number;
  delta: number;
  duration_days: number;
  uses: string[] | string;
  ethics_ref: string | null;
  model_source: string | null;
}

export interface IReview {
  reviewer: string;
  office: string;
  decision: 'approve' | 'reject';
  comment: string;
  version: number;
  ts: string | number;
}

export interface IApplicationInfo {
  id: string | number;
  project: string;
  applicant: string;
  status: string;
  version: number;
  request: IApplicationRequest;
  rule: {
    level: PrivacyLevel | string;
    reviewers: number;
    offices: string[];
    [key: string]: unknown;
  };
  reviews: IReview[];
  needs: string | null;
  /**
   * Stewards' view of a pending application: the project's active grants on
   * the requested datasets (approving over one another application gave needs
   * `on_existing_grant`).
   */
  existing_grants?: IExistingGrant[];
}

/** What approving does to a grant the project already holds. */
export type ExistingGrantChoice = 'add' | 'replace' | 'keep';

export interface IExistingGrant extends IGrant {
  id: string | number;
  project: string;
  application_id: string | number | null;
}

export interface IApplicationsResponse {
  sites: {
    [site: string]:
      { status: 'ok'; applications: IApplicationInfo[] } | IUnreachable;
  };
}

export interface IStewardGrant extends IGrant {
  id: string | number;
  project: string;
}

export interface IDatasetBudget {
  dataset: string;
  level: PrivacyLevel | string;
  cap_epsilon: number;
  spent_epsilon: number;
  /** The largest epsilon one more release could have under the cap (see IGrant). */
  largest_next_epsilon: number;
  grants: IStewardGrant[];
  /** How the site's file keeps the catalog's rows-per-patient bound (stewards only). */
  max_rows_per_unit?: number | null;
  most_rows_per_patient?: number | null;
  patients_over_bound?: number;
  on_excess_rows?: 'truncate' | 'refuse';
}

export interface IStewardBudgetsResponse {
  sites: {
    [site: string]: { status: 'ok'; budgets: IDatasetBudget[] } | IUnreachable;
  };
}

export interface IAuditEntry {
  seq: number;
  ts: string | number;
  principal: string;
  role: string;
  action: string;
  decision: string;
  project: string | null;
  dataset: string | null;
  epsilon: number | null;
  rho: number | null;
  delta: number | null;
  reason: string | null;
  hash: string;
  /** The entry's cost as epsilon at the site's reporting delta, computed by the site. */
  epsilon_at_reporting_delta: number | null;
}

/** A page of the log, newest first; `total`: entries matching the filters. */
export interface IAuditResponse {
  entries: IAuditEntry[];
  total: number;
}

/** The filtered log as JSON lines or CSV, to be saved. */
export interface IAuditExportResponse {
  filename: string;
  content: string;
}

export interface IAuditVerifyResponse {
  ok: boolean;
  entries: number;
  problems: string[];
}

/** Error body returned by every Veil endpoint. */
export interface IApiErrorBody {
  code: string;
  message: string;
  hint: string | null;
}

/** A failed Veil API call: carries the server's code, message and hint. */
export class VeilApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly hint: string | null
  ) {
    super(message);
    this.name = 'VeilApiError';
  }
}

/** Turn anything thrown by a request into a VeilApiError. */
export function toApiError(error: unknown): VeilApiError {
  if (error instanceof VeilApiError) {
    return error;
  }
  const message = error instanceof Error ? error.message : String(error);
  return new VeilApiError(0, 'network_error', message, null);
}

/** Build a URL path segment-safe from user data (site, dataset, id). */
export function apiPath(...segments: (string | number)[]): string {
  return segments.map(s => encodeURIComponent(String(s))).join('/');
}

/**
 * Call a Veil endpoint on the Jupyter server and return its JSON body.
 *
 * @param endPoint path under `veil/api/`, e.g. `budget` or `steward/audit?site=x`
 * @param init request options; a plain object `body` should be JSON text
 * @throws VeilApiError with the server's `{code, message, hint}` on 4xx/5xx
 */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'veil/api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new VeilApiError(
      0,
      'network_error',
      `Could not reach the Jupyter server: ${String(error)}`,
      'Check that JupyterLab is still running.'
    );
  }
  const text = await response.text();
  let data: unknown = null;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const body = (data ?? {}) as Partial<IApiErrorBody>;
    if (response.status === 404 && !body.code) {
      throw new VeilApiError(
        404,
        'not_found',
        `Veil endpoint not found: ${endPoint}`,
        'Is the Veil server extension installed and enabled? Try `jupyter server extension list`.'
      );
    }
    throw new VeilApiError(
      response.status,
      body.code ?? `http_${response.status}`,
      body.message ?? (response.statusText || `HTTP ${response.status}`),
      body.hint ?? null
    );
  }
  return data as T;
}

/** POST a JSON body to a Veil endpoint. */
export function postAPI<T>(endPoint: string, body: unknown): Promise<T> {
  return requestAPI<T>(endPoint, {
    method: 'POST',
    body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json' }
  });
}
