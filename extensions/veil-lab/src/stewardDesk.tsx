/**
 * Steward desk (main area): applications to review, budgets and grants, the
 * audit log and the usage report of each site the steward is responsible for.
 */
import { Dialog, InputDialog, showDialog } from '@jupyterlab/apputils';
import { ReactWidget } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';
import * as React from 'react';

import {
  apiPath,
  ExistingGrantChoice,
  IApplicationInfo,
  IApplicationsResponse,
  IAuditEntry,
  IAuditExportResponse,
  IAuditResponse,
  IAuditVerifyResponse,
  IDatasetBudget,
  IExistingGrant,
  IStewardBudgetsResponse,
  IStewardGrant,
  IWhoAmI,
  IWhoAmIResponse,
  postAPI,
  requestAPI,
  toApiError,
  VeilApiError
} from './api';
import {
  appendPage,
  AUDIT_FILTERS,
  AUDIT_PAGE,
  AuditFilters,
  auditQuery,
  formatCost,
  NO_FILTERS
} from './auditModel';
import {
  describeGrant,
  formatEpsilon,
  grantsToDecide,
  NEXT_RELEASE_NOTE,
  reviewBlocked
} from './budgetModel';
import { ErrorBox, formatTime, formatValue, LevelBadge } from './components';
import { deskIcon } from './icons';
import { ReportTab } from './reportTab';

/** Load JSON from an endpoint into state, with loading and error. */
function useResource<T>(endPoint: string | null) {
  const [data, setData] = React.useState<T | null>(null);
  const [error, setError] = React.useState<VeilApiError | null>(null);
  const [loading, setLoading] = React.useState(false);
  const reload = React.useCallback(async () => {
    if (endPoint === null) {
      return;
    }
    setLoading(true);
    setError(null);
    try {
      setData(await requestAPI<T>(endPoint));
    } catch (e) {
      setError(toApiError(e));
    } finally {
      setLoading(false);
    }
  }, [endPoint]);
  React.useEffect(() => {
    void reload();
  }, [reload]);
  return { data, error, loading, reload };
}

function RefreshButton(props: {
  loading: boolean;
  onClick: () => void;
}): JSX.Element {
  return (
    <button
      className="jp-mod-styled veil-button"
      onClick={props.onClick}
      disabled={props.loading}
    >
      {props.loading ? 'Loading…' : 'Refresh'}
    </button>
  );
}

// ---------------------------------------------------------------- applications

/**
 * Ask the steward what approving does to the project's existing grant(s):
 * add, replace or keep; null when they cancel.
 */
async function askExistingGrant(
  app: IApplicationInfo,
  held: IExistingGrant[]
): Promise<ExistingGrantChoice | null> {
  const r = app.request;
  const body = (
    <div className="veil-existing-choice">
      <p>The project already holds:</p>
      <ul>
        {held.map(g => (
          <li key={String(g.id)}>{describeGrant(g)}</li>
        ))}
      </ul>
      <p>
        This application requests ε {formatEpsilon(r.epsilon)} for{' '}
        {r.duration_days} days.
      </p>
      <ul>
        <li>
          <strong>Add</strong>: the budgets compose (rho adds up); the later
          expiry and both uses stand.
        </li>
        <li>
          <strong>Replace</strong>: the grant becomes what this application
          asks; what it spent stays spent.
        </li>
        <li>
          <strong>Keep</strong>: the grant stays as it is; the application is
          approved without changing it.
        </li>
      </ul>
    </div>
  );
  const choices: ExistingGrantChoice[] = ['add', 'replace', 'keep'];
  const result = await showDialog({
    title: `Approve #${app.id}: the project already holds a grant`,
    body,
    buttons: [
      Dialog.cancelButton(),
      Dialog.okButton({ label: 'Keep', caption: 'keep the existing grant' }),
      Dialog.okButton({ label: 'Replace', caption: 'replace it' }),
      Dialog.okButton({ label: 'Add', caption: 'add the new budget to it' })
    ]
  });
  if (!result.button.accept) {
    return null;
  }
  const picked = result.button.label.toLowerCase() as ExistingGrantChoice;
  return choices.includes(picked) ? picked : null;
}

function ApplicationCard(props: {
  site: string;
  app: IApplicationInfo;
  me: IWhoAmI | null;
  onReviewed: () => void;
}): JSX.Element {
  const { site, app } = props;
  const blocked = reviewBlocked(app, props.me);
  const [comment, setComment] = React.useState('');
  const [busy, setBusy] = React.useState(false);
  const [error, setError] = React.useState<VeilApiError | string | null>(null);

  const review = async (decision: 'approve' | 'reject') => {
    if (!comment.trim()) {
      setError('A comment is required to approve or reject.');
      return;
    }
    let choice: ExistingGrantChoice | null = null;
    const held = grantsToDecide(app);
    if (decision === 'approve' && held.length) {
      choice = await askExistingGrant(app, held);
      if (choice === null) {
        return;
      }
    }
    setBusy(true);
    setError(null);
    try {
      await postAPI<IApplicationInfo>(
        `steward/applications/${apiPath(site, app.id)}/reviews`,
        {
          decision,
          comment: comment.trim(),
          version: app.version,
          ...(choice ? { on_existing_grant: choice } : {})
        }
      );
      setComment('');
      props.onReviewed();
    } catch (e) {
      setError(toApiError(e));
    } finally {
      setBusy(false);
    }
  };

  const r = app.request;
  const uses = Array.isArray(r.uses) ? r.uses.join(', ') : r.uses;
  return (
    <div className="veil-card veil-application" data-application={app.id}>
      <div className="veil-card-head">
        <LevelBadge level={String(app.rule?.level ?? '')} />
        <strong>{app.project}</strong>
        <span>by {app.applicant}</span>
        <span className="veil-muted">
          #{app.id} v{app.version} · {app.status}
        </span>
      </div>
      <p className="veil-purpose">{r.purpose}</p>
      <dl className="veil-meta">
        <dt>Datasets</dt>
        <dd>{(r.datasets ?? []).join(', ')}</dd>
        <dt>Budget</dt>
        <dd>
          ε {formatEpsilon(r.epsilon)}, δ{' '}
          {r.delta === null || r.delta === undefined
            ? "the site's default"
            : formatValue(r.delta)}{' '}
          for {r.duration_days} days
        </dd>
        <dt>Uses</dt>
        <dd>{uses}</dd>
        <dt>Ethics ref.</dt>
        <dd>{r.ethics_ref ?? '—'}</dd>
        {r.model_source ? (
          <>
            <dt>Model source</dt>
            <dd>{r.model_source}</dd>
          </>
        ) : null}
        <dt>Rule</dt>
        <dd>
          {app.rule?.reviewers ?? 0} reviewer(s)
          {app.rule?.offices?.length
            ? ` from ${app.rule.offices.join(', ')}`
            : ''}
        </dd>
      </dl>
      {app.needs ? <div className="veil-needs">Needs: {app.needs}</div> : null}
      {app.existing_grants?.length ? (
        <div className="veil-existing-grants">
          The project already holds:
          <ul>
            {app.existing_grants.map(g => (
              <li key={String(g.id)}>
                {describeGrant(g)}
                {String(g.application_id) === String(app.id)
                  ? " (this application's own: approving replaces it)"
                  : ' (approving asks: add, replace or keep)'}
              </li>
            ))}
          </ul>
        </div>
      ) : null}
      {app.reviews?.length ? (
        <ul className="veil-reviews">
          {app.reviews.map((rv, i) => (
            <li key={i}>
              <strong>{rv.decision}</strong> by {rv.reviewer} ({rv.office}) on v
              {rv.version}, {formatTime(rv.ts)}: {rv.comment}
            </li>
          ))}
        </ul>
      ) : null}
      {blocked ? <p className="veil-muted veil-blocked">{blocked}</p> : null}
      <textarea
        className="veil-comment"
        placeholder="Review comment (required)"
        value={comment}
        onChange={e => setComment(e.target.value)}
        disabled={busy || blocked !== null}
      />
      <div className="veil-actions">
        <button
          className="jp-mod-styled jp-mod-accept veil-button"
          disabled={busy || blocked !== null}
          title={blocked ?? undefined}
          onClick={() => review('approve')}
        >
          Approve
        </button>
        <button
          className="jp-mod-styled jp-mod-warn veil-button"
          disabled={busy || blocked !== null}
          title={blocked ?? undefined}
          onClick={() => review('reject')}
        >
          Reject
        </button>
      </div>
      <ErrorBox error={error} />
    </div>
  );
}

function ApplicationsTab(props: {
  whoami: IWhoAmIResponse | null;
}): JSX.Element {
  const { data, error, loading, reload } = useResource<IApplicationsResponse>(
    'steward/applications?status=pending'
  );
  const sites = data ? Object.keys(data.sites ?? {}) : [];
  return (
    <div>
      <div className="veil-toolbar">
        <h3>Pending applications</h3>
        <RefreshButton loading={loading} onClick={reload} />
      </div>
      <ErrorBox error={error} />
      {sites.map(site => {
        const entry = data!.sites[site];
        return (
          <section key={site} className="veil-site" data-site={site}>
            <h4>{site}</h4>
            {entry.status !== 'ok' ? (
              <ErrorBox error={`${site} unreachable: ${entry.error}`} />
            ) : entry.applications.length === 0 ? (
              <p className="veil-empty">No pending applications.</p>
            ) : (
              entry.applications.map(app => (
                <ApplicationCard
                  key={String(app.id)}
                  site={site}
                  app={app}
                  me={signedIn(props.whoami, site)}
                  onReviewed={reload}
                />
              ))
            )}
          </section>
        );
      })}
    </div>
  );
}

// --------------------------------------------------------------------- budgets

/** The reason a steward gives for an action (recorded in the audit log); null when cancelled or empty. */
async function askReason(
  title: string,
  okLabel: string
): Promise<string | null> {
  const result = await InputDialog.getText({
    title,
    label: 'Reason (recorded in the audit log)',
    okLabel
  });
  const reason = result.value?.trim();
  return result.button.accept && reason ? reason : null;
}

/** The body of the revoke dialog: what is revoked, and a required reason. */
class RevokeBody extends Widget implements Dialog.IBodyWidget<string> {
  constructor(site: string, grant: IStewardGrant, required: boolean) {
    super();
    this.addClass('veil-revoke-body');
    const text = document.createElement('p');
    text.textContent =
      `Revoke grant ${grant.id} at ${site}: project ${grant.project}, ` +
      `dataset ${grant.dataset}. The project can make no more releases ` +
      'under it; what it spent stays spent. This cannot be undone.';
    const label = document.createElement('label');
    label.textContent = 'Reason (required, recorded in the audit log)';
    this._input = document.createElement('textarea');
    this._input.className = 'veil-revoke-reason';
    this._input.rows = 3;
    label.appendChild(this._input);
    this._note = document.createElement('p');
    this._note.className = 'veil-revoke-required';
    this._note.setAttribute('role', 'alert');
    this._note.textContent = 'A reason is required to revoke a grant.';
    this._note.hidden = !required;
    this._input.addEventListener('input', () => this._sync());
    this.node.append(text, label, this._note);
  }

  getValue(): string {
    return this._input.value.trim();
  }

  protected onAfterAttach(): void {
    this._sync();
    this._input.focus();
  }

  /** The Revoke button is off while the reason is empty. */
  private _sync(): void {
    const empty = this.getValue() === '';
    const dialog = this.node.closest('.jp-Dialog');
    dialog
      ?.querySelectorAll<HTMLButtonElement>('.jp-Dialog-button.jp-mod-warn')
      .forEach(button => {
        button.disabled = empty;
      });
    if (!empty) {
      this._note.hidden = true;
    }
  }

  private _input: HTMLTextAreaElement;
  private _note: HTMLParagraphElement;
}

/**
 * Ask for the reason to revoke a grant (destructive: a warn button naming the
 * site, project and dataset); null when cancelled. An empty reason is
 * refused: the dialog comes back saying a reason is required.
 */
async function askRevokeReason(
  site: string,
  grant: IStewardGrant
): Promise<string | null> {
  let required = false;
  for (;;) {
    const result = await showDialog<string>({
      title: `Revoke grant ${grant.id} at ${site}?`,
      body: new RevokeBody(site, grant, required),
      buttons: [
        Dialog.cancelButton(),
        Dialog.warnButton({
          label: 'Revoke',
          caption: `revoke ${grant.project}'s grant on ${grant.dataset} at ${site}`
        })
      ],
      focusNodeSelector: '.veil-revoke-reason'
    });
    if (!result.button.accept) {
      return null;
    }
    const reason = (result.value ?? '').trim();
    if (reason) {
      return reason;
    }
    required = true;
  }
}

/** A warning when the site's file breaks its catalog's rows-per-patient bound; nothing otherwise. */
function BrokenBound(props: { budget: IDatasetBudget }): JSX.Element | null {
  const b = props.budget;
  if (!b.patients_over_bound) {
    return null;
  }
  const refusing = b.on_excess_rows === 'refuse';
  return (
    <p className="veil-needs veil-broken-bound">
      The site&apos;s file breaks max_rows_per_unit = {b.max_rows_per_unit}:{' '}
      {b.patients_over_bound} patients have more rows (up to{' '}
      {b.most_rows_per_patient}).{' '}
      {refusing
        ? 'Requests on it are refused.'
        : `Queries keep at most ${b.max_rows_per_unit} rows per patient, so counts and sums come out low.`}{' '}
      Fix the file, or raise max_rows_per_unit in the catalog
      {refusing ? '' : ', or set on_excess_rows = "refuse"'}.
    </p>
  );
}

function BudgetsTab(): JSX.Element {
  const { data, error, loading, reload } =
    useResource<IStewardBudgetsResponse>('steward/budgets');
  const [actionError, setActionError] = React.useState<VeilApiError | null>(
    null
  );

  /** Run a steward's action, then reload; its refusal is shown above the table. */
  const act = async (work: () => Promise<unknown>) => {
    try {
      setActionError(null);
      await work();
      await reload();
    } catch (e) {
      setActionError(toApiError(e));
    }
  };

  const revoke = async (site: string, grant: IStewardGrant) => {
    const reason = await askRevokeReason(site, grant);
    if (reason !== null) {
      await act(() =>
        postAPI(`steward/grants/${apiPath(site, grant.id)}/revoke`, { reason })
      );
    }
  };

  const changeCap = async (site: string, dataset: string, cap: number) => {
    const value = await InputDialog.getNumber({
      title: `New lifetime ε cap for ${site}/${dataset}`,
      value: cap,
      okLabel: 'Next'
    });
    if (
      !value.button.accept ||
      value.value === null ||
      !Number.isFinite(value.value)
    ) {
      return;
    }
    const reason = await askReason(
      `Change cap of ${site}/${dataset} to ε ${value.value}`,
      'Change cap'
    );
    if (reason !== null) {
      await act(() =>
        postAPI(`steward/budgets/${apiPath(site, dataset)}/cap`, {
          epsilon: value.value,
          reason
        })
      );
    }
  };

  const sites = data ? Object.keys(data.sites ?? {}) : [];
  return (
    <div>
      <div className="veil-toolbar">
        <h3>Budgets and grants</h3>
        <RefreshButton loading={loading} onClick={reload} />
      </div>
      <ErrorBox error={error} />
      <ErrorBox error={actionError} onDismiss={() => setActionError(null)} />
      {sites.map(site => {
        const entry = data!.sites[site];
        return (
          <section key={site} className="veil-site" data-site={site}>
            <h4>{site}</h4>
            {entry.status !== 'ok' ? (
              <ErrorBox error={`${site} unreachable: ${entry.error}`} />
            ) : (
              entry.budgets.map(b => (
                <div className="veil-card" key={b.dataset}>
                  <div className="veil-card-head">
                    <LevelBadge level={String(b.level)} />
                    <strong>{b.dataset}</strong>
                    <span title={NEXT_RELEASE_NOTE}>
                      cap ε {formatEpsilon(b.cap_epsilon)} · spent{' '}
                      {formatEpsilon(b.spent_epsilon)} · largest next release{' '}
                      {formatEpsilon(b.largest_next_epsilon)}
                    </span>
                    <button
                      className="jp-mod-styled veil-button"
                      onClick={() => changeCap(site, b.dataset, b.cap_epsilon)}
                    >
                      Change cap
                    </button>
                  </div>
                  <BrokenBound budget={b} />
                  {b.grants.length === 0 ? (
                    <p className="veil-empty">No grants.</p>
                  ) : (
                    <table className="veil-table">
                      <thead>
                        <tr>
                          <th>Grant</th>
                          <th>Project</th>
                          <th>Granted ε</th>
                          <th>Spent</th>
                          <th title={NEXT_RELEASE_NOTE}>
                            Largest next release
                          </th>
                          <th>Status</th>
                          <th>Expires</th>
                          <th />
                        </tr>
                      </thead>
                      <tbody>
                        {b.grants.map(g => (
                          <tr key={String(g.id)}>
                            <td>{g.id}</td>
                            <td>{g.project}</td>
                            <td>{formatEpsilon(g.epsilon)}</td>
                            <td>{formatEpsilon(g.epsilon_spent)}</td>
                            <td>{formatEpsilon(g.largest_next_epsilon)}</td>
                            <td>{g.status}</td>
                            <td>{formatTime(g.expires_at) || '—'}</td>
                            <td>
                              {g.status === 'active' ? (
                                <button
                                  className="jp-mod-styled jp-mod-warn veil-button"
                                  onClick={() => revoke(site, g)}
                                >
                                  Revoke
                                </button>
                              ) : null}
                            </td>
                          </tr>
                        ))}
                      </tbody>
                    </table>
                  )}
                </div>
              ))
            )}
          </section>
        );
      })}
    </div>
  );
}

// ----------------------------------------------------------------------- audit

/** Does an audit entry contain the filter text (case-insensitive)? */
export function auditEntryMatches(entry: IAuditEntry, filter: string): boolean {
  const needle = filter.trim().toLowerCase();
  if (!needle) {
    return true;
  }
  return Object.values(entry).some(
    v => v !== null && String(v).toLowerCase().includes(needle)
  );
}

/** Save text as a file through the browser. */
function download(filename: string, content: string): void {
  const type = filename.endsWith('.csv') ? 'text/csv' : 'application/x-ndjson';
  const url = URL.createObjectURL(new Blob([content], { type }));
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  link.click();
  window.setTimeout(() => URL.revokeObjectURL(url), 0);
}

function AuditTab(props: { sites: string[] }): JSX.Element {
  const [site, setSite] = React.useState(props.sites[0] ?? '');
  const [draft, setDraft] = React.useState<AuditFilters>(NO_FILTERS);
  const [filters, setFilters] = React.useState<AuditFilters>(NO_FILTERS);
  const [search, setSearch] = React.useState('');
  const [entries, setEntries] = React.useState<IAuditEntry[]>([]);
  const [total, setTotal] = React.useState<number | null>(null);
  const [loading, setLoading] = React.useState(false);
  const [error, setError] = React.useState<VeilApiError | null>(null);
  const [format, setFormat] = React.useState<'jsonl' | 'csv'>('csv');
  const q = encodeURIComponent(site);
  const check = useResource<IAuditVerifyResponse>(
    site ? `steward/audit/verify?site=${q}` : null
  );
  /** The newest page (no `before`), or the page older than `before`. */
  const load = React.useCallback(
    async (before?: number) => {
      if (!site) {
        return;
      }
      setLoading(true);
      setError(null);
      try {
        const page = await requestAPI<IAuditResponse>(
          `steward/audit?${auditQuery(site, filters, { limit: AUDIT_PAGE, before })}`
        );
        setEntries(old =>
          before === undefined ? page.entries : appendPage(old, page.entries)
        );
        setTotal(page.total);
      } catch (e) {
        setError(toApiError(e));
      } finally {
        setLoading(false);
      }
    },
    [site, filters]
  );
  React.useEffect(() => {
    void load();
  }, [load]);
  const exportLog = async (): Promise<void> => {
    setError(null);
    try {
      const file = await requestAPI<IAuditExportResponse>(
        `steward/audit/export?${auditQuery(site, filters, { format })}`
      );
      download(file.filename, file.content);
    } catch (e) {
      setError(toApiError(e));
    }
  };
  const shown = entries.filter(e => auditEntryMatches(e, search));
  const v = check.data;
  return (
    <div>
      <div className="veil-toolbar">
        <h3>Audit log</h3>
        <select value={site} onChange={e => setSite(e.target.value)}>
          {props.sites.map(s => (
            <option key={s} value={s}>
              {s}
            </option>
          ))}
        </select>
        {check.loading ? (
          <span className="veil-badge">checking chain…</span>
        ) : v ? (
          <span
            className={`veil-badge ${v.ok ? 'veil-badge-ok' : 'veil-badge-bad'}`}
            title={v.problems.join('\n')}
          >
            {v.ok
              ? `chain verified (${v.entries} entries)`
              : `chain broken: ${v.problems.length} problem(s)`}
          </span>
        ) : null}
        <RefreshButton
          loading={loading}
          onClick={() => {
            void load();
            void check.reload();
          }}
        />
      </div>
      <form
        className="veil-toolbar veil-audit-filters"
        onSubmit={e => {
          e.preventDefault();
          setFilters({ ...draft });
        }}
      >
        {AUDIT_FILTERS.map(key => (
          <input
            key={key}
            className="veil-filter"
            type="search"
            aria-label={`Filter by ${key}`}
            placeholder={key}
            value={draft[key]}
            onChange={e => setDraft({ ...draft, [key]: e.target.value })}
          />
        ))}
        <button type="submit" className="jp-mod-styled veil-button">
          Apply filters
        </button>
        <select
          aria-label="Export format"
          value={format}
          onChange={e =>
            setFormat(e.target.value === 'jsonl' ? 'jsonl' : 'csv')
          }
        >
          <option value="csv">CSV</option>
          <option value="jsonl">JSON lines</option>
        </select>
        <button
          type="button"
          className="jp-mod-styled veil-button"
          onClick={() => void exportLog()}
        >
          Export
        </button>
      </form>
      <div className="veil-toolbar">
        <span className="veil-audit-count">
          {total === null
            ? ''
            : `${total} entries${total > entries.length ? `, newest ${entries.length} shown` : ''}`}
        </span>
        <input
          className="veil-filter"
          type="search"
          placeholder="Search shown entries"
          value={search}
          onChange={e => setSearch(e.target.value)}
        />
      </div>
      <ErrorBox error={error} />
      <ErrorBox error={check.error} />
      {v && !v.ok ? (
        <ul className="veil-problems">
          {v.problems.map((p, i) => (
            <li key={i}>{p}</li>
          ))}
        </ul>
      ) : null}
      <div className="veil-table-scroll">
        <table className="veil-table veil-audit">
          <thead>
            <tr>
              <th>#</th>
              <th>Time</th>
              <th>Principal</th>
              <th>Role</th>
              <th>Action</th>
              <th>Decision</th>
              <th>Project</th>
              <th>Dataset</th>
              <th title="this entry's cost, as epsilon at the site's reporting delta (computed by the site; costs do not add up)">
                ε
              </th>
              <th>Reason</th>
              <th>Hash</th>
            </tr>
          </thead>
          <tbody>
            {shown.map(e => (
              <tr key={e.seq}>
                <td>{e.seq}</td>
                <td>{formatTime(e.ts)}</td>
                <td>{e.principal}</td>
                <td>{e.role}</td>
                <td>{e.action}</td>
                <td>{e.decision}</td>
                <td>{e.project ?? ''}</td>
                <td>{e.dataset ?? ''}</td>
                <td title={e.rho ? `rho ${e.rho}` : undefined}>
                  {formatCost(e)}
                </td>
                <td>{e.reason ?? ''}</td>
                <td>
                  <code title={e.hash}>{e.hash.slice(0, 10)}</code>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {total !== null && entries.length < total ? (
        <button
          className="jp-mod-styled veil-button"
          disabled={loading}
          onClick={() => void load(entries[entries.length - 1]?.seq)}
        >
          {loading ? 'Loading…' : 'Load older'}
        </button>
      ) : null}
    </div>
  );
}

// ------------------------------------------------------------------------ desk

type Tab = 'applications' | 'budgets' | 'audit' | 'report';

/** Who the desk is signed in as at a site; null when unknown. */
function signedIn(
  whoami: IWhoAmIResponse | null,
  site: string
): IWhoAmI | null {
  const entry = whoami?.sites?.[site];
  return entry && entry.status === 'ok' ? entry.whoami : null;
}

/** One line per site: who the steward config signs in as there. */
function SignedIn(props: {
  sites: string[];
  whoami: IWhoAmIResponse | null;
  error: VeilApiError | null;
}): JSX.Element {
  return (
    <div className="veil-signed-in veil-muted" aria-label="Signed in">
      {props.sites.map(site => {
        const entry = props.whoami?.sites?.[site];
        let text = '…';
        let title = 'asking the site';
        if (props.error) {
          text = 'unknown';
          title = props.error.message;
        } else if (entry && entry.status === 'ok') {
          const w = entry.whoami;
          text = `${w.principal} (${w.role}${w.office ? `, ${w.office}` : ''})`;
          title = `signed in at ${site} as ${text}`;
        } else if (entry) {
          text = entry.status;
          title = entry.error;
        }
        return (
          <span
            key={site}
            className="veil-signed-in-site"
            data-site={site}
            title={title}
          >
            {site}: {text}
          </span>
        );
      })}
    </div>
  );
}

function Desk(props: { sites: string[] }): JSX.Element {
  const [tab, setTab] = React.useState<Tab>('applications');
  const whoami = useResource<IWhoAmIResponse>('steward/whoami');
  const tabs: [Tab, string][] = [
    ['applications', 'Applications'],
    ['budgets', 'Budgets'],
    ['audit', 'Audit'],
    ['report', 'Report']
  ];
  return (
    <div className="veil-desk">
      <div className="veil-tabs" role="tablist">
        {tabs.map(([id, label]) => (
          <button
            key={id}
            role="tab"
            aria-selected={tab === id}
            className={`veil-tab ${tab === id ? 'veil-tab-active' : ''}`}
            onClick={() => setTab(id)}
          >
            {label}
          </button>
        ))}
        <SignedIn
          sites={props.sites}
          whoami={whoami.data}
          error={whoami.error}
        />
      </div>
      <div className="veil-tab-body" role="tabpanel">
        {tab === 'applications' ? (
          <ApplicationsTab whoami={whoami.data} />
        ) : null}
        {tab === 'budgets' ? <BudgetsTab /> : null}
        {tab === 'audit' ? <AuditTab sites={props.sites} /> : null}
        {tab === 'report' ? <ReportTab sites={props.sites} /> : null}
      </div>
    </div>
  );
}

export class StewardDesk extends ReactWidget {
  constructor(private _sites: string[]) {
    super();
    this.id = 'veil-steward-desk';
    this.title.label = 'Veil steward desk';
    this.title.icon = deskIcon;
    this.title.closable = true;
    this.addClass('veil-steward');
  }

  render(): JSX.Element {
    return <Desk sites={this._sites} />;
  }
}
