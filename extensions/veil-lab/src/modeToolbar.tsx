/**
 * The notebook toolbar's Veil item: MOCK or LIVE for the notebook's kernel,
 * and a notice when the notebook's outputs hold live releases while the
 * kernel is in mock mode (re-running cells will not reproduce them).
 */
import { Notification } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { ModeBadge } from './budgetStatus';
import { isVeilPanel, VeilKernelBridge } from './kernelBridge';
import {
  LIVE_OUTPUTS_IN_MOCK,
  needsLiveNotice,
  ReleaseHistory
} from './releaseHistory';

export class ModeToolbarItem extends ReactWidget {
  constructor(
    private _panel: NotebookPanel,
    private _bridge: VeilKernelBridge,
    private _history: ReleaseHistory
  ) {
    super();
    this.addClass('veil-mode-toolbar');
    _bridge.modeChanged.connect(this._onChanged, this);
    _bridge.kernelChanged.connect(this._onChanged, this);
    _history.changed.connect(this._onChanged, this);
    this._onChanged();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._bridge.modeChanged.disconnect(this._onChanged, this);
    this._bridge.kernelChanged.disconnect(this._onChanged, this);
    this._history.changed.disconnect(this._onChanged, this);
    super.dispose();
  }

  render(): JSX.Element | null {
    if (!isVeilPanel(this._panel)) {
      return null;
    }
    const mode = this._bridge.mode(this._panel);
    const notice = needsLiveNotice(mode, this._history.inOutputs);
    return (
      <span className="veil-mode-item">
        <ModeBadge mode={mode} />
        {notice ? (
          <span
            className="veil-live-notice"
            role="status"
            title={LIVE_OUTPUTS_IN_MOCK}
          >
            {/* short: the item comes first, and a long text would push the notebook's own buttons into
                the toolbar's "More commands" menu; the title says it in full */}
            ⚠ live outputs
          </span>
        ) : null}
      </span>
    );
  }

  private _onChanged(_sender?: unknown, panel?: unknown): void {
    if (panel instanceof NotebookPanel && panel !== this._panel) {
      return;
    }
    const mode = this._bridge.mode(this._panel);
    if (
      !this._notified &&
      isVeilPanel(this._panel) &&
      needsLiveNotice(mode, this._history.inOutputs)
    ) {
      this._notified = true; // once per notebook
      Notification.warning(LIVE_OUTPUTS_IN_MOCK, { autoClose: 10000 });
    }
    this.update();
  }

  private _notified = false;
}
