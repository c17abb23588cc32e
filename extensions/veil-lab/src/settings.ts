/**
 * The extension's settings (schema/plugin.json), read with their defaults.
 * Plain TypeScript, no DOM, so it can be unit-tested.
 */
import { LOW_BUDGET_FRACTION, toLowFraction } from './budgetModel';

/** How often the budget is refetched while a Veil notebook is current, by default. */
export const DEFAULT_POLL_MS = 30_000;

/** Never poll more often than this, whatever the settings say (0 turns polling off). */
export const MIN_POLL_MS = 1_000;

export interface IVeilSettings {
  /** Budget refetch interval in ms; 0: no timed refetch. */
  pollInterval: number;
  /** Fraction of a grant under which the status bar warns. */
  lowBudgetFraction: number;
}

/** The settings from a composite settings object (or none: the defaults). */
export function readSettings(
  composite: { [key: string]: unknown } | null | undefined
): IVeilSettings {
  const raw = composite?.pollInterval;
  let pollInterval = DEFAULT_POLL_MS;
  if (typeof raw === 'number' && Number.isFinite(raw) && raw >= 0) {
    pollInterval = raw === 0 ? 0 : Math.max(MIN_POLL_MS, Math.round(raw));
  }
  const fraction = composite?.lowBudgetFraction;
  return {
    pollInterval,
    lowBudgetFraction:
      fraction === undefined ? LOW_BUDGET_FRACTION : toLowFraction(fraction)
  };
}
