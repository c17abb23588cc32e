/** Status bar view of the BudgetModel, with the current notebook's mode (MOCK or LIVE). */
import { ReactWidget } from '@jupyterlab/ui-components';
import { ISignal } from '@lumino/signaling';
import * as React from 'react';

import type { VeilMode } from './api';
import { BudgetModel } from './budgetModel';

/** What a mode means, for tooltips. */
export const MODE_TITLES: { [mode in VeilMode]: string } = {
  mock: 'MOCK mode: queries run locally on made-up rows; nothing is spent, results are not real. Switch with %veil mode live.',
  live: 'LIVE mode: every query is a DP release at the sites and spends privacy budget. Switch with %veil mode mock.'
};

/** The MOCK / LIVE badge (status bar and notebook toolbar). */
export function ModeBadge(props: {
  mode: VeilMode | null;
}): JSX.Element | null {
  if (!props.mode) {
    return null;
  }
  return (
    <span
      className={`veil-mode veil-mode-${props.mode}`}
      title={MODE_TITLES[props.mode]}
    >
      {props.mode === 'live' ? 'LIVE' : 'MOCK'}
    </span>
  );
}

export class BudgetStatus extends ReactWidget {
  constructor(
    private _model: BudgetModel,
    private _onClick: () => void,
    private _mode: () => VeilMode | null = () => null,
    modeChanged?: ISignal<unknown, unknown>
  ) {
    super();
    this.addClass('veil-budget-status');
    _model.changed.connect(() => this.update(), this);
    modeChanged?.connect(() => this.update(), this);
  }

  render(): JSX.Element {
    const m = this._model;
    const classes = ['veil-budget'];
    if (m.hasError) {
      classes.push('veil-budget-error');
    } else if (m.low) {
      classes.push('veil-budget-low');
    }
    return (
      <span className="veil-status-item">
        <ModeBadge mode={this._mode()} />
        <span
          className={classes.join(' ')}
          title={m.tooltip || 'Veil privacy budget'}
          onClick={this._onClick}
        >
          {m.text}
        </span>
      </span>
    );
  }
}
