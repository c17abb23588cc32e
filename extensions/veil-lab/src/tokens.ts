import { NotebookPanel } from '@jupyterlab/notebook';
import { Token } from '@lumino/coreutils';

import { BudgetModel } from './budgetModel';
import { VeilKernelBridge } from './kernelBridge';
import { ReleaseHistory } from './releaseHistory';

/** Shared Veil state, provided by the `veil-lab:plugin` plugin. */
export interface IVeil {
  /** Comm connections to Veil kernels. */
  readonly bridge: VeilKernelBridge;
  /** Budget of the active project, refreshed from the server. */
  readonly budget: BudgetModel;
  /** Fetch the budget now (coalesces concurrent calls). */
  refreshBudget(): Promise<void>;
  /** The release history of a notebook (created on first use). */
  historyFor(panel: NotebookPanel): ReleaseHistory;
}

export const IVeil = new Token<IVeil>(
  'veil-lab:IVeil',
  'Shared Veil state: kernel comm bridge, budget model and release histories.'
);
