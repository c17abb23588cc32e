/** Right sidebar: the current notebook's live releases, their costs, the grant after each, and receipts. */
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { IVerifyResponse, postAPI, toApiError, VeilApiError } from './api';
import { ErrorBox } from './components';
import { historyIcon } from './icons';
import {
  describeCost,
  describeGrantState,
  ReleaseHistory,
  shortReceipt,
  ZCDP_NOTE
} from './releaseHistory';

/** Ask the server to check each release (its receipt, query, dataset and cost) against its site's audit log. */
export async function verifyReceipts(history: ReleaseHistory): Promise<void> {
  const pending = history.unverified();
  if (pending.length === 0) {
    return;
  }
  const response = await postAPI<IVerifyResponse>('receipts/verify', {
    releases: pending.map(r => ({
      site: r.site,
      dataset: r.dataset,
      query: r.query,
      cost: r.cost,
      receipt: r.receipt
    }))
  });
  history.setVerifications(response.results ?? []);
}

/** Show the cell whose output holds a release (by receipt). */
export type SelectRelease = (receipt: string) => void;

export class ReleasesPanel extends ReactWidget {
  constructor(private _select: SelectRelease = () => undefined) {
    super();
    this.id = 'veil-releases';
    this.title.icon = historyIcon;
    this.title.caption = 'Veil release history';
    this.addClass('veil-panel');
  }

  /** Show the history of another notebook (or none). */
  setHistory(history: ReleaseHistory | null, label: string): void {
    if (this._history) {
      this._history.changed.disconnect(this._onChanged, this);
    }
    this._history = history;
    this._label = label;
    this._error = null;
    if (history) {
      history.changed.connect(this._onChanged, this);
    }
    this._onChanged();
  }

  render(): JSX.Element {
    const history = this._history;
    return (
      <div className="veil-panel-body">
        <div className="veil-toolbar">
          <h2>Veil releases</h2>
          <button
            className="jp-mod-styled veil-button"
            disabled={!history || this._verifying}
            onClick={() => this._verify(true)}
          >
            {this._verifying ? 'Verifying…' : 'Verify receipts'}
          </button>
        </div>
        {!history ? (
          <p className="veil-empty">Open a notebook to see its releases.</p>
        ) : (
          this._renderHistory(history)
        )}
      </div>
    );
  }

  private _renderHistory(history: ReleaseHistory): JSX.Element {
    const states = history.grantStates();
    return (
      <>
        <div className="veil-caption">{this._label}</div>
        <ErrorBox error={this._error} />
        {history.size === 0 ? (
          <p className="veil-empty">
            No live releases yet. Mock runs spend nothing and are not listed.
          </p>
        ) : (
          <>
            <ul className="veil-grant-states">
              {states.map(s => (
                <li
                  className="veil-grant-state"
                  key={`${s.site}/${s.dataset}`}
                  data-site={s.site}
                  data-dataset={s.dataset}
                >
                  <strong>
                    {s.site} / {s.dataset}
                  </strong>{' '}
                  <span className="veil-muted">
                    {s.count} release{s.count === 1 ? '' : 's'}
                  </span>
                  <div className="veil-grant-figures">
                    {s.grant
                      ? `now: ${describeGrantState(s.grant)}`
                      : describeGrantState(null)}
                  </div>
                </li>
              ))}
            </ul>
            <p className="veil-zcdp-note">{ZCDP_NOTE}</p>
            <ul className="veil-release-list">
              {history.releases
                .slice()
                .reverse()
                .map(r => {
                  const v = history.verification(r.receipt);
                  const state = v ? (v.ok ? 'ok' : 'bad') : 'pending';
                  const cell = history.cellOf(r.receipt);
                  return (
                    <li
                      className={`veil-release ${cell ? 'veil-release-shown' : 'veil-release-unshown'}`}
                      key={r.receipt}
                      data-receipt={r.receipt}
                      title={
                        cell
                          ? 'Click to show the cell whose output holds this release'
                          : 'Not shown in any output (kept in the notebook metadata)'
                      }
                      onClick={() => {
                        if (cell) {
                          this._select(r.receipt);
                        }
                      }}
                    >
                      <div className="veil-release-head">
                        <span className="veil-release-cost">
                          {describeCost(r.cost)}
                        </span>
                        <span className="veil-release-where">
                          {r.site} / {r.dataset}
                        </span>
                      </div>
                      <div className="veil-release-grant">
                        after it: {describeGrantState(r.grant)}
                      </div>
                      <pre className="veil-release-query">{r.query}</pre>
                      <div className="veil-release-receipt">
                        <code title={r.receipt}>{shortReceipt(r.receipt)}</code>
                        <span
                          className={`veil-verify veil-verify-${state}`}
                          title={v?.detail ?? 'not verified yet'}
                        >
                          {state === 'ok'
                            ? '✓ verified'
                            : state === 'bad'
                              ? '✗ does not verify'
                              : '… unverified'}
                        </span>
                        {cell ? null : (
                          <span className="veil-muted veil-release-hidden">
                            not displayed
                          </span>
                        )}
                      </div>
                    </li>
                  );
                })}
            </ul>
          </>
        )}
      </>
    );
  }

  private _onChanged(): void {
    this.update();
    if (this._history && this._history.unverified().length > 0) {
      // Batch bursts of releases into one verification call.
      window.clearTimeout(this._timer);
      this._timer = window.setTimeout(() => this._verify(false), 500);
    }
  }

  private async _verify(userAsked: boolean): Promise<void> {
    const history = this._history;
    if (!history || this._verifying) {
      return;
    }
    if (!userAsked && this._error) {
      return; // do not hammer a failing endpoint; the button retries
    }
    this._verifying = true;
    this._error = null;
    this.update();
    try {
      await verifyReceipts(history);
    } catch (e) {
      this._error = toApiError(e);
    } finally {
      this._verifying = false;
      this.update();
    }
  }

  private _history: ReleaseHistory | null = null;
  private _label = '';
  private _error: VeilApiError | null = null;
  private _verifying = false;
  private _timer = 0;
}
