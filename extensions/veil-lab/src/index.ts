import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  Notification
} from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Poll } from '@lumino/polling';
import { Signal } from '@lumino/signaling';

import { IBudgetResponse, IStewardInfo, requestAPI, toApiError } from './api';
import { BudgetModel } from './budgetModel';
import { BudgetStatus } from './budgetStatus';
import { DatasetsPanel } from './datasetsPanel';
import { isVeilPanel, VeilKernelBridge } from './kernelBridge';
import { ReleaseHistory } from './releaseHistory';
import { ReleasesPanel } from './releasesPanel';
import { StewardDesk } from './stewardDesk';
import { veilIcon } from './icons';
import { IVeil } from './tokens';

export { BudgetModel } from './budgetModel';
export { ReleaseHistory } from './releaseHistory';
export { IVeil } from './tokens';

/** How often the budget is refetched while a Veil notebook is active... */
const BUDGET_POLL_MS = 30_000;

/** ...and the longest wait between tries while the server keeps failing (backoff). */
const BUDGET_POLL_MAX_MS = 300_000;

/** Debounce for re-reading a notebook's outputs after it changes. */
const HISTORY_RELOAD_MS = 1_000;

namespace CommandIDs {
  export const stewardDesk = 'veil:steward-desk';
  export const showDatasets = 'veil:show-datasets';
  export const showReleases = 'veil:show-releases';
}

/** Shared state: kernel comms, budget model, per-notebook release history. */
const core: JupyterFrontEndPlugin<IVeil> = {
  id: 'veil-lab:core',
  description: 'Veil kernel comm, budget model and release histories.',
  autoStart: true,
  requires: [INotebookTracker],
  provides: IVeil,
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker): IVeil => {
    const bridge = new VeilKernelBridge(tracker);
    const budget = new BudgetModel();
    const histories = new WeakMap<NotebookPanel, ReleaseHistory>();
    let inFlight: Promise<void> | null = null;
    let again = false;

    const fetchBudget = async (): Promise<void> => {
      try {
        budget.update(await requestAPI<IBudgetResponse>('budget'));
      } catch (error) {
        budget.setError(toApiError(error).message);
      }
    };

    const refreshBudget = (): Promise<void> => {
      if (inFlight) {
        // A release may land while a fetch is in flight: fetch once more.
        again = true;
        return inFlight;
      }
      inFlight = fetchBudget().finally(() => {
        inFlight = null;
        if (again) {
          again = false;
          void refreshBudget();
        }
      });
      return inFlight;
    };

    const reloadHistory = (panel: NotebookPanel) => {
      const model = panel.model;
      if (model && !panel.isDisposed) {
        historyFor(panel).loadNotebook(model.toJSON() as any);
      }
    };

    const historyFor = (panel: NotebookPanel): ReleaseHistory => {
      let history = histories.get(panel);
      if (!history) {
        history = new ReleaseHistory();
        histories.set(panel, history);
        let timer = 0;
        const schedule = () => {
          window.clearTimeout(timer);
          timer = window.setTimeout(
            () => reloadHistory(panel),
            HISTORY_RELOAD_MS
          );
        };
        void panel.context.ready.then(() => {
          reloadHistory(panel);
          panel.model?.contentChanged.connect(schedule);
        });
        panel.disposed.connect(() => window.clearTimeout(timer));
      }
      return history;
    };

    NotebookActions.executed.connect((_, { notebook }) => {
      const panel = tracker.find(p => p.content === notebook);
      if (panel) {
        reloadHistory(panel);
      }
    });

    bridge.budget.connect((_, { panel, event }) => {
      if (event.mock) {
        return;
      }
      budget.applyRelease(event);
      historyFor(panel).add(event);
      void refreshBudget();
    });

    const refreshIfVeil = () => {
      if (isVeilPanel(tracker.currentWidget)) {
        void refreshBudget();
      }
    };
    tracker.currentChanged.connect(refreshIfVeil);
    bridge.kernelChanged.connect((_, panel) => {
      if (panel === tracker.currentWidget) {
        refreshIfVeil();
      }
    });
    // Refetch on a schedule while a Veil notebook is current; a failed fetch rejects, so the poll backs
    // off (up to BUDGET_POLL_MAX_MS) until the server answers again. Standby while the page is hidden.
    const poll = new Poll({
      auto: false,
      factory: async () => {
        if (!isVeilPanel(tracker.currentWidget)) {
          return;
        }
        await refreshBudget();
        if (budget.requestError) {
          throw new Error(budget.requestError);
        }
      },
      frequency: {
        interval: BUDGET_POLL_MS,
        backoff: true,
        max: BUDGET_POLL_MAX_MS
      },
      name: 'veil-lab:budget',
      standby: 'when-hidden'
    });
    void app.restored.then(() => poll.start());

    return { bridge, budget, refreshBudget, historyFor };
  }
};

/** Status bar item: the largest next release (ε) per site of the current notebook. */
const budgetStatus: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:budget-status',
  description:
    'Shows the Veil privacy budget in the status bar: the largest next release, granted and spent.',
  autoStart: true,
  requires: [IVeil, INotebookTracker, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    veil: IVeil,
    tracker: INotebookTracker,
    statusBar: IStatusBar
  ) => {
    const item = new BudgetStatus(veil.budget, () => {
      if (app.commands.hasCommand(CommandIDs.showReleases)) {
        void app.commands.execute(CommandIDs.showReleases);
      }
    });
    const activeChanged = new Signal<typeof item, void>(item);
    tracker.currentChanged.connect(() => activeChanged.emit());
    veil.bridge.kernelChanged.connect(() => activeChanged.emit());
    statusBar.registerStatusItem('veil-lab:budget-status', {
      item,
      align: 'left',
      rank: 100,
      isActive: () => isVeilPanel(tracker.currentWidget),
      activeStateChanged: activeChanged
    });
  }
};

/** Left sidebar panel listing the study's datasets. */
const datasets: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:datasets',
  description: 'Veil datasets browser in the left sidebar.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null
  ) => {
    const insert = (source: string) => {
      const panel = tracker.currentWidget;
      if (!panel) {
        Notification.warning(
          'Open a notebook with the Veil kernel first, then insert the cell.',
          { autoClose: 5000 }
        );
        return;
      }
      const notebook = panel.content;
      NotebookActions.insertBelow(notebook);
      NotebookActions.changeCellType(notebook, 'code');
      notebook.activeCell?.model.sharedModel.setSource(source);
      app.shell.activateById(panel.id);
    };
    const panel = new DatasetsPanel(insert);
    app.shell.add(panel, 'left', { rank: 850 });
    app.commands.addCommand(CommandIDs.showDatasets, {
      label: 'Veil: Show datasets',
      execute: () => app.shell.activateById(panel.id)
    });
  }
};

/** Right sidebar panel: the current notebook's live releases. */
const releases: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:releases',
  description: 'Veil release history of the current notebook.',
  autoStart: true,
  requires: [IVeil, INotebookTracker],
  activate: (app: JupyterFrontEnd, veil: IVeil, tracker: INotebookTracker) => {
    const panel = new ReleasesPanel();
    app.shell.add(panel, 'right', { rank: 850 });
    const follow = () => {
      const current = tracker.currentWidget;
      panel.setHistory(
        current ? veil.historyFor(current) : null,
        current ? current.context.path : ''
      );
    };
    tracker.currentChanged.connect(follow);
    follow();
    app.commands.addCommand(CommandIDs.showReleases, {
      label: 'Veil: Show release history',
      execute: () => app.shell.activateById(panel.id)
    });
  }
};

/** Steward desk: shown only when the server says the user is a steward. */
const steward: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:steward',
  description: 'Veil steward desk: applications, budgets and audit.',
  autoStart: true,
  optional: [ICommandPalette, ILauncher],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    launcher: ILauncher | null
  ) => {
    let info: IStewardInfo = { enabled: false, sites: [] };
    let desk: MainAreaWidget<StewardDesk> | null = null;

    app.commands.addCommand(CommandIDs.stewardDesk, {
      label: 'Veil: Steward desk',
      caption: 'Review applications, manage budgets and read the audit log',
      icon: args => (args['isPalette'] ? undefined : veilIcon),
      isEnabled: () => info.enabled,
      isVisible: () => info.enabled,
      execute: () => {
        if (!info.enabled) {
          return;
        }
        if (!desk || desk.isDisposed) {
          desk = new MainAreaWidget({ content: new StewardDesk(info.sites) });
          desk.id = 'veil-steward-desk-main';
          desk.title.label = 'Veil steward desk';
          desk.title.icon = veilIcon;
          app.shell.add(desk, 'main');
        }
        app.shell.activateById(desk.id);
      }
    });
    palette?.addItem({ command: CommandIDs.stewardDesk, category: 'Veil' });

    requestAPI<IStewardInfo>('steward')
      .then(response => {
        info = {
          enabled: response?.enabled === true,
          sites: Array.isArray(response?.sites) ? response.sites : []
        };
        app.commands.notifyCommandChanged(CommandIDs.stewardDesk);
        if (info.enabled && launcher) {
          launcher.add({
            command: CommandIDs.stewardDesk,
            category: 'Veil',
            rank: 1
          });
        }
      })
      .catch(error => {
        // Not a steward, or no server extension: keep the desk hidden.
        console.debug(
          'Veil: steward desk disabled:',
          toApiError(error).message
        );
      });
  }
};

const plugins: JupyterFrontEndPlugin<any>[] = [
  core,
  budgetStatus,
  datasets,
  releases,
  steward
];

export default plugins;
