/**
 * VeilKernelBridge: opens the `veil` comm on every notebook whose kernel is
 * the Veil kernel and re-emits its messages as signals.
 */
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import type { IBudgetEvent, IReadyEvent, VeilMode } from './api';

/** Kernel spec name of the Veil kernel. */
export const VEIL_KERNEL_NAME = 'veil';

/** Comm target name registered by the Veil kernel. */
export const VEIL_COMM_TARGET = 'veil';

export interface IBridgeEvent<T> {
  panel: NotebookPanel;
  event: T;
}

/** Is the panel's current kernel the Veil kernel? */
export function isVeilPanel(panel: NotebookPanel | null | undefined): boolean {
  return panel?.sessionContext.session?.kernel?.name === VEIL_KERNEL_NAME;
}

/** 'mock' or 'live' from a message; null for anything else. */
export function toMode(value: unknown): VeilMode | null {
  return value === 'mock' || value === 'live' ? value : null;
}

export class VeilKernelBridge {
  constructor(tracker: INotebookTracker) {
    tracker.widgetAdded.connect((_, panel) => this._watch(panel));
    tracker.forEach(panel => this._watch(panel));
  }

  /** A kernel announced itself on the comm. */
  get ready(): ISignal<this, IBridgeEvent<IReadyEvent>> {
    return this._ready;
  }

  /** A kernel made a live release. */
  get budget(): ISignal<this, IBridgeEvent<IBudgetEvent>> {
    return this._budget;
  }

  /** The kernel (or its Veil-ness) of some notebook changed. */
  get kernelChanged(): ISignal<this, NotebookPanel> {
    return this._kernelChanged;
  }

  /** The mode of some notebook's kernel changed (or became known). */
  get modeChanged(): ISignal<this, NotebookPanel> {
    return this._modeChanged;
  }

  /** The `ready` message of the panel's kernel, if received. */
  info(panel: NotebookPanel): IReadyEvent | undefined {
    const kernel = panel.sessionContext.session?.kernel;
    return kernel ? this._info.get(kernel.id) : undefined;
  }

  /** The mode of the panel's kernel as it last announced it; null before it did (or not Veil). */
  mode(panel: NotebookPanel | null | undefined): VeilMode | null {
    const kernel = panel?.sessionContext.session?.kernel;
    if (!kernel || kernel.name !== VEIL_KERNEL_NAME) {
      return null;
    }
    return this._modes.get(kernel.id) ?? null;
  }

  private _watch(panel: NotebookPanel): void {
    const ctx = panel.sessionContext;
    const check = () => {
      this._ensureComm(panel);
      this._kernelChanged.emit(panel);
    };
    ctx.kernelChanged.connect(check);
    ctx.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'dead') {
        const kernel = ctx.session?.kernel;
        if (kernel) {
          this._comms.delete(kernel.id);
          this._info.delete(kernel.id);
          this._modes.delete(kernel.id);
          this._modeChanged.emit(panel);
        }
      } else if (status === 'idle') {
        this._ensureComm(panel);
      }
    });
    void ctx.ready.then(check);
  }

  private _ensureComm(panel: NotebookPanel): void {
    const kernel = panel.sessionContext.session?.kernel;
    if (
      !kernel ||
      kernel.isDisposed ||
      kernel.name !== VEIL_KERNEL_NAME ||
      this._comms.has(kernel.id)
    ) {
      return;
    }
    let comm: Kernel.IComm;
    try {
      comm = kernel.createComm(VEIL_COMM_TARGET);
    } catch (error) {
      console.warn('Veil: could not create the veil comm', error);
      return;
    }
    this._comms.set(kernel.id, comm);
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg) =>
      this._onMessage(panel, kernel.id, msg.content.data);
    comm.onClose = () => {
      this._comms.delete(kernel.id);
    };
    try {
      comm.open({});
    } catch (error) {
      this._comms.delete(kernel.id);
      console.warn('Veil: could not open the veil comm', error);
    }
  }

  private _onMessage(panel: NotebookPanel, kernelId: string, data: unknown) {
    if (typeof data !== 'object' || data === null) {
      return;
    }
    const msg = data as { type?: unknown };
    if (msg.type === 'ready') {
      const event = data as unknown as IReadyEvent;
      this._info.set(kernelId, event);
      // a kernel that does not say is in mock mode: every study starts so
      this._setMode(panel, kernelId, toMode(event.mode) ?? 'mock');
      this._ready.emit({ panel, event });
    } else if (msg.type === 'mode') {
      const mode = toMode((data as { mode?: unknown }).mode);
      if (mode) {
        this._setMode(panel, kernelId, mode);
      }
    } else if (msg.type === 'budget') {
      this._budget.emit({ panel, event: data as unknown as IBudgetEvent });
    }
  }

  private _setMode(panel: NotebookPanel, kernelId: string, mode: VeilMode) {
    if (this._modes.get(kernelId) !== mode) {
      this._modes.set(kernelId, mode);
      this._modeChanged.emit(panel);
    }
  }

  private _comms = new Map<string, Kernel.IComm>();
  private _modes = new Map<string, VeilMode>();
  private _modeChanged = new Signal<this, NotebookPanel>(this);
  private _info = new Map<string, IReadyEvent>();
  private _ready = new Signal<this, IBridgeEvent<IReadyEvent>>(this);
  private _budget = new Signal<this, IBridgeEvent<IBudgetEvent>>(this);
  private _kernelChanged = new Signal<this, NotebookPanel>(this);
}
