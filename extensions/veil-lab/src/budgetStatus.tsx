/** Status bar view of the BudgetModel. */
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { BudgetModel } from './budgetModel';

export class BudgetStatus extends ReactWidget {
  constructor(
    private _model: BudgetModel,
    private _onClick: () => void
  ) {
    super();
    this.addClass('veil-budget-status');
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => {
          const m = this._model;
          const classes = ['veil-budget'];
          if (m.hasError) {
            classes.push('veil-budget-error');
          } else if (m.low) {
            classes.push('veil-budget-low');
          }
          return (
            <span
              className={classes.join(' ')}
              title={m.tooltip || 'Veil privacy budget'}
              onClick={this._onClick}
            >
              {m.text}
            </span>
          );
        }}
      </UseSignal>
    );
  }
}
