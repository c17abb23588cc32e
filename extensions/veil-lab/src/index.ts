import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  Notification,
  WidgetTracker
} from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Poll } from '@lumino/polling';
import { Signal } from '@lumino/signaling';

import {
  IBudgetEvent,
  IBudgetResponse,
  IStewardInfo,
  requestAPI,
  toApiError
} from './api';
import { BudgetModel } from './budgetModel';
import { BudgetStatus } from './budgetStatus';
import { DatasetsPanel } from './datasetsPanel';
import { isVeilPanel, VeilKernelBridge } from './kernelBridge';
import { ModeToolbarItem } from './modeToolbar';
import { ReleaseHistory, withRelease } from './releaseHistory';
import { ReleasesPanel } from './releasesPanel';
import { IVeilSettings, readSettings } from './settings';
import { StandingPanel } from './standingPanel';
import { StewardDesk } from './stewardDesk';
import { deskIcon } from './icons';
import { IVeil } from './tokens';

export { BudgetModel } from './budgetModel';
export { ReleaseHistory } from './releaseHistory';
export { IVeil } from './tokens';

/** The longest wait between tries while the server keeps failing (backoff). */
const BUDGET_POLL_MAX_MS = 300_000;

/** Debounce for re-reading a notebook's outputs after it changes. */
const HISTORY_RELOAD_MS = 1_000;

namespace CommandIDs {
  export const stewardDesk = 'veil:steward-desk';
  export const showDatasets = 'veil:show-datasets';
  export const showReleases = 'veil:show-releases';
  export const showStanding = 'veil:show-standing';
  export const refreshBudget = 'veil:refresh-budget';
}

/** The plugin whose settings (schema/plugin.json) this extension reads. */
const PLUGIN_ID = 'veil-lab:plugin';

/**
 * A poll that runs `factory` on the settings' interval (0: never), backs off after a failure (a rejected
 * `factory`) up to BUDGET_POLL_MAX_MS, stands by while the page is hidden and starts once the layout is
 * restored; `onSettings` also sees the settings when they load and each time they change.
 */
function settingsPoll(
  app: JupyterFrontEnd,
  settingRegistry: ISettingRegistry | null,
  name: string,
  factory: () => Promise<void>,
  onSettings?: (settings: IVeilSettings) => void
): void {
  const frequency = (pollInterval: number) => ({
    interval: pollInterval > 0 ? pollInterval : Poll.NEVER,
    backoff: true,
    max: BUDGET_POLL_MAX_MS
  });
  const poll = new Poll({
    auto: false,
    factory,
    frequency: frequency(readSettings(null).pollInterval),
    name,
    standby: 'when-hidden'
  });
  void app.restored.then(() => poll.start());
  const apply = (settings: ISettingRegistry.ISettings) => {
    const read = readSettings(settings.composite);
    onSettings?.(read);
    poll.frequency = frequency(read.pollInterval);
  };
  if (settingRegistry) {
    void Promise.all([settingRegistry.load(PLUGIN_ID), app.restored])
      .then(([settings]) => {
        apply(settings);
        settings.changed.connect(apply);
      })
      .catch(reason =>
        console.warn('Veil: could not load the settings', reason)
      );
  }
}

/** Shared state: kernel comms, budget model, per-notebook release history. */
const core: JupyterFrontEndPlugin<IVeil> = {
  id: PLUGIN_ID,
  description:
    'Veil kernel comm, budget model, release histories and the notebook mode item.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ISettingRegistry, ICommandPalette],
  provides: IVeil,
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null
  ): IVeil => {
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

    /** Keep every announced live release in the notebook's metadata (saved with it), displayed or not. */
    const persist = (panel: NotebookPanel, event: IBudgetEvent) => {
      const model = panel.model;
      if (!model || panel.isDisposed) {
        return;
      }
      const next = withRelease(model.getMetadata('veil'), event);
      if (next) {
        model.setMetadata('veil', next);
      }
    };

    bridge.budget.connect((_, { panel, event }) => {
      if (event.mock) {
        return;
      }
      budget.applyRelease(event);
      historyFor(panel).add(event);
      persist(panel, event);
      void refreshBudget();
    });

    // MOCK or LIVE in each Veil notebook's toolbar, with a notice when live outputs meet a mock kernel.
    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (panel: NotebookPanel) => {
        const item = new ModeToolbarItem(panel, bridge, historyFor(panel));
        // first: a narrow main area moves the toolbar's last items into its "More commands" menu
        panel.toolbar.insertItem(0, 'veil-mode', item);
        return item;
      }
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
    settingsPoll(
      app,
      settingRegistry,
      'veil-lab:budget',
      async () => {
        if (!isVeilPanel(tracker.currentWidget)) {
          return;
        }
        await refreshBudget();
        if (budget.requestError) {
          throw new Error(budget.requestError);
        }
      },
      ({ lowBudgetFraction }) => {
        budget.lowFraction = lowBudgetFraction; // the low-budget threshold too, as it changes
      }
    );

    app.commands.addCommand(CommandIDs.refreshBudget, {
      label: 'Veil: Refresh privacy budget',
      caption: 'Fetch the budget of every site now',
      execute: () => refreshBudget()
    });
    palette?.addItem({ command: CommandIDs.refreshBudget, category: 'Veil' });

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
    const item = new BudgetStatus(
      veil.budget,
      () => {
        if (app.commands.hasCommand(CommandIDs.showReleases)) {
          void app.commands.execute(CommandIDs.showReleases);
        }
      },
      () => veil.bridge.mode(tracker.currentWidget),
      veil.bridge.modeChanged
    );
    tracker.currentChanged.connect(() => item.update());
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
  optional: [ILabShell, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
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
    restorer?.add(panel, 'veil-datasets');
    app.commands.addCommand(CommandIDs.showDatasets, {
      label: 'Veil: Show datasets',
      caption: "The study's sites and datasets, with mock previews",
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: CommandIDs.showDatasets, category: 'Veil' });
  }
};

/** Right sidebar panel: the current notebook's live releases. */
const releases: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:releases',
  description: 'Veil release history of the current notebook.',
  autoStart: true,
  requires: [IVeil, INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    veil: IVeil,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    /** Scroll to and select the cell whose output holds the release. */
    const select = (receipt: string) => {
      const current = tracker.currentWidget;
      if (!current) {
        return;
      }
      const where = veil.historyFor(current).cellOf(receipt);
      if (!where) {
        return;
      }
      const notebook = current.content;
      let index = where.id
        ? notebook.widgets.findIndex(c => c.model.id === where.id)
        : -1;
      if (index < 0) {
        index = where.index;
      }
      const cell = notebook.widgets[index];
      if (!cell) {
        return;
      }
      app.shell.activateById(current.id);
      notebook.deselectAll();
      notebook.activeCellIndex = index;
      notebook.mode = 'command';
      void notebook.scrollToCell(cell, 'center');
    };
    const panel = new ReleasesPanel(select);
    app.shell.add(panel, 'right', { rank: 850 });
    restorer?.add(panel, 'veil-releases');
    const follow = () => {
      const current = tracker.currentWidget;
      panel.setHistory(
        current ? veil.historyFor(current) : null,
        current ? current.context.path : ''
      );
    };
    tracker.currentChanged.connect(follow);
    tracker.widgetAdded.connect((_, added) =>
      added.context.pathChanged.connect(() => {
        if (added === tracker.currentWidget) {
          follow();
        }
      })
    );
    follow();
    app.commands.addCommand(CommandIDs.showReleases, {
      label: 'Veil: Show release history',
      caption: "The current notebook's live releases and their receipts",
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: CommandIDs.showReleases, category: 'Veil' });
  }
};

/** Left sidebar panel: the project's standing queries at each site, refreshed on the budget's poll interval. */
const standing: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:standing',
  description:
    'Veil standing queries: per site, their windows, next release and up-front budget.',
  autoStart: true,
  optional: [ICommandPalette, ILayoutRestorer, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null
  ) => {
    const panel = new StandingPanel();
    app.shell.add(panel, 'left', { rank: 860 });
    restorer?.add(panel, 'veil-standing');
    // Refetch on the settings' poll interval while the panel is shown (it also refetches when shown);
    // a failed fetch backs off like the budget's poll.
    settingsPoll(app, settingRegistry, 'veil-lab:standing', async () => {
      if (!panel.isVisible) {
        return;
      }
      await panel.refresh();
      if (panel.failed) {
        throw new Error('the standing queries could not be fetched');
      }
    });
    app.commands.addCommand(CommandIDs.showStanding, {
      label: 'Veil: Show standing queries',
      caption:
        "The project's standing queries at each site: windows released, next release and budget",
      execute: () => app.shell.activateById(panel.id)
    });
    palette?.addItem({ command: CommandIDs.showStanding, category: 'Veil' });
  }
};

/** Steward desk: shown only when the server says the user is a steward. */
const steward: JupyterFrontEndPlugin<void> = {
  id: 'veil-lab:steward',
  description: 'Veil steward desk: applications, budgets and audit.',
  autoStart: true,
  optional: [ICommandPalette, ILauncher, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null
  ) => {
    let info: IStewardInfo = { enabled: false, sites: [] };
    let desk: MainAreaWidget<StewardDesk> | null = null;
    const tracker = new WidgetTracker<MainAreaWidget<StewardDesk>>({
      namespace: 'veil-steward-desk'
    });

    const loaded = requestAPI<IStewardInfo>('steward')
      .then(response => {
        info = {
          enabled: response?.enabled === true,
          sites: Array.isArray(response?.sites) ? response.sites : []
        };
      })
      .catch(error => {
        // Not a steward, or no server extension: keep the desk hidden.
        console.debug(
          'Veil: steward desk disabled:',
          toApiError(error).message
        );
      });

    app.commands.addCommand(CommandIDs.stewardDesk, {
      label: 'Veil: Open steward desk',
      caption: 'Review applications, manage budgets and read the audit log',
      icon: args => (args['isPalette'] ? undefined : deskIcon),
      isEnabled: () => info.enabled,
      isVisible: () => info.enabled,
      execute: async () => {
        await loaded; // the layout restorer may ask before the server said
        if (!info.enabled) {
          return;
        }
        if (!desk || desk.isDisposed) {
          desk = new MainAreaWidget({ content: new StewardDesk(info.sites) });
          desk.id = 'veil-steward-desk-main';
          desk.title.label = 'Veil steward desk';
          desk.title.icon = deskIcon;
          app.shell.add(desk, 'main');
          void tracker.add(desk);
        }
        app.shell.activateById(desk.id);
        return desk;
      }
    });
    palette?.addItem({ command: CommandIDs.stewardDesk, category: 'Veil' });
    // The desk's tab comes back after a page reload.
    void restorer?.restore(tracker, {
      command: CommandIDs.stewardDesk,
      name: () => 'veil-steward-desk'
    });

    void loaded.then(() => {
      app.commands.notifyCommandChanged(CommandIDs.stewardDesk);
      if (info.enabled && launcher) {
        launcher.add({
          command: CommandIDs.stewardDesk,
          category: 'Veil',
          rank: 1
        });
      }
    });
  }
};

const plugins: JupyterFrontEndPlugin<any>[] = [
  core,
  budgetStatus,
  datasets,
  releases,
  standing,
  steward
];

export default plugins;
