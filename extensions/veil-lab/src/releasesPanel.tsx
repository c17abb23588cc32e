/** Right sidebar: the current notebook's live releases and their receipts. */
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { IVerifyResponse, postAPI, toApiError, VeilApiError } from './api';
import { formatEpsilon } from './budgetModel';
import { ErrorBox } from './components';
import { veilIcon } from './icons';
import { ReleaseHistory, shortReceipt } from './releaseHistory';

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

export class ReleasesPanel extends ReactWidget {
  constructor() {
    super();
    this.id = 'veil-releases';
    this.title.icon = veilIcon;
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
    const totals = history.totals();
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
            <div className="veil-totals">
              {totals.map(t => (
                <span
                  className="veil-total"
                  key={t.site}
                  title="The epsilons of these releases, added up. The site's ledger adds up rho, so what the grant has spent (in epsilon) is less."
                >
                  {t.site}: {t.count} release{t.count === 1 ? '' : 's'}, ε{' '}
                  {formatEpsilon(t.epsilon)}
                </span>
              ))}
            </div>
            <ul className="veil-release-list">
              {history.releases
                .slice()
                .reverse()
                .map(r => {
                  const v = history.verification(r.receipt);
                  const state = v ? (v.ok ? 'ok' : 'bad') : 'pending';
                  return (
                    <li
                      className="veil-release"
                      key={r.receipt}
                      data-receipt={r.receipt}
                    >
                      <div className="veil-release-head">
                        <span className="veil-release-cost">
                          ε {formatEpsilon(r.cost.epsilon)}
                        </span>
                        <span>
                          {r.site} / {r.dataset}
                        </span>
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
