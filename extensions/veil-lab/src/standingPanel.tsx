/** Left sidebar: the project's standing queries at each site, their next release and up-front budget. */
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import {
  IStandingInfo,
  IStandingResponse,
  requestAPI,
  toApiError,
  VeilApiError
} from './api';
import { ErrorBox, formatTime } from './components';
import { standingIcon } from './icons';
import {
  budgetTooltip,
  describeBudget,
  describeLastReleased,
  describeProgress,
  describeStatus,
  ISiteStanding,
  nextRelease,
  noStandingQueries,
  SETUP_HINT,
  siteStanding
} from './standingModel';

function StandingCard(props: { info: IStandingInfo; now: Date }): JSX.Element {
  const { info, now } = props;
  const next = nextRelease(info, now);
  return (
    <div
      className="veil-card veil-standing"
      data-name={info.spec.name}
      data-status={info.status}
    >
      <div className="veil-card-head">
        <strong className="veil-standing-name">{info.spec.name}</strong>
        <code className="veil-dataset-id">{info.dataset}</code>
        <span
          className={`veil-badge veil-standing-status veil-standing-${info.status}`}
          title={describeStatus(info)}
        >
          {info.status}
        </span>
      </div>
      <dl className="veil-meta">
        <dt>Windows released</dt>
        <dd className="veil-standing-progress">{describeProgress(info)}</dd>
        <dt>Next release</dt>
        <dd className="veil-standing-next">
          {next.window === null ? (
            next.relative
          ) : (
            <>
              window {next.window} {next.relative}{' '}
              <span
                className="veil-muted"
                title={`your local time: ${formatTime(info.next_release_at)}`}
              >
                ({next.absolute})
              </span>
            </>
          )}
        </dd>
        <dt>Budget</dt>
        <dd className="veil-standing-budget" title={budgetTooltip(info)}>
          {describeBudget(info)}{' '}
          <span className="veil-muted">charged up front</span>
        </dd>
        <dt>Last released</dt>
        <dd className="veil-standing-last">{describeLastReleased(info)}</dd>
      </dl>
      {info.status_reason ? (
        <div className="veil-muted">{info.status_reason}</div>
      ) : null}
    </div>
  );
}

function EmptyState(): JSX.Element {
  return (
    <div className="veil-empty veil-standing-empty">
      <p>No standing queries yet.</p>
      <p>
        A standing query counts a SQL query window by window and is released by
        each site once a window closes, its whole budget charged once, up front.
        Set one up from a notebook with <code>{SETUP_HINT}</code>; tutorial 6
        walks through it.
      </p>
    </div>
  );
}

function SiteSection(props: { entry: ISiteStanding; now: Date }): JSX.Element {
  const { entry, now } = props;
  return (
    <section className="veil-site" data-site={entry.site}>
      <h3>{entry.site}</h3>
      {entry.error !== null ? (
        <ErrorBox error={entry.error} />
      ) : entry.queries.length === 0 ? (
        <p className="veil-empty">No standing queries at this site.</p>
      ) : (
        entry.queries.map(info => (
          <StandingCard key={info.id} info={info} now={now} />
        ))
      )}
    </section>
  );
}

/** The panel: refreshed on demand and by the extension's poll while it is shown. */
export class StandingPanel extends ReactWidget {
  constructor() {
    super();
    this.id = 'veil-standing';
    this.title.icon = standingIcon;
    this.title.caption = 'Veil standing queries';
    this.addClass('veil-panel');
  }

  /** Fetch the standing queries now (a call while one is in flight joins it). */
  refresh(): Promise<void> {
    if (!this._inFlight) {
      this._inFlight = this._fetch().finally(() => {
        this._inFlight = null;
        this.update();
      });
      this.update();
    }
    return this._inFlight;
  }

  /** Whether the last fetch failed as a whole (the server did not answer). */
  get failed(): boolean {
    return this._error !== null;
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  render(): JSX.Element {
    const sites = this._data ? siteStanding(this._data) : [];
    const empty = this._data !== null && noStandingQueries(sites);
    const now = new Date();
    return (
      <div className="veil-panel-body">
        <div className="veil-toolbar">
          <h2>Veil standing queries</h2>
          <button
            className="jp-mod-styled veil-button"
            onClick={() => void this.refresh()}
            disabled={this._inFlight !== null}
          >
            {this._inFlight ? 'Loading…' : 'Refresh'}
          </button>
        </div>
        <ErrorBox error={this._error} />
        {this._data && sites.length === 0 ? (
          <p className="veil-empty">No sites are configured for this study.</p>
        ) : empty ? (
          <EmptyState />
        ) : null}
        {sites
          .filter(s => !empty || s.error !== null)
          .map(entry => (
            <SiteSection key={entry.site} entry={entry} now={now} />
          ))}
      </div>
    );
  }

  private async _fetch(): Promise<void> {
    try {
      this._data = await requestAPI<IStandingResponse>('standing');
      this._error = null;
    } catch (e) {
      this._error = toApiError(e);
    }
  }

  private _data: IStandingResponse | null = null;
  private _error: VeilApiError | null = null;
  private _inFlight: Promise<void> | null = null;
}
