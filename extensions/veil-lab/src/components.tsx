/** Small React pieces shared by the Veil panels. */
import * as React from 'react';

import { VeilApiError } from './api';

/** Shows a Veil API error: its message and, when given, the hint. */
export function ErrorBox(props: {
  error: VeilApiError | string | null;
  onDismiss?: () => void;
}): JSX.Element | null {
  const { error } = props;
  if (!error) {
    return null;
  }
  const message = typeof error === 'string' ? error : error.message;
  const hint = typeof error === 'string' ? null : error.hint;
  const code = typeof error === 'string' ? null : error.code;
  return (
    <div className="veil-error" role="alert">
      <div className="veil-error-message">
        {message}
        {code ? <span className="veil-error-code"> ({code})</span> : null}
      </div>
      {hint ? <div className="veil-error-hint">Hint: {hint}</div> : null}
      {props.onDismiss ? (
        <button className="veil-link-button" onClick={props.onDismiss}>
          Dismiss
        </button>
      ) : null}
    </div>
  );
}

/** Privacy level badge (L1/L2/L3). */
export function LevelBadge(props: { level: string }): JSX.Element {
  const level = String(props.level).toUpperCase();
  return (
    <span
      className={`veil-level veil-level-${level.toLowerCase()}`}
      title={levelTitle(level)}
    >
      {level}
    </span>
  );
}

function levelTitle(level: string): string {
  switch (level) {
    case 'L1':
      return 'L1, desensitized/open: DP aggregates within a default grant, no review';
    case 'L2':
      return 'L2, controlled: needs an approved project application';
    case 'L3':
      return 'L3, restricted: ethics approval and two distinct reviewers';
    default:
      return level;
  }
}

/** Renders any JSON cell value compactly. */
export function formatValue(value: unknown): string {
  if (value === null || value === undefined) {
    return '';
  }
  if (typeof value === 'number') {
    return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }
  if (typeof value === 'object') {
    return JSON.stringify(value);
  }
  return String(value);
}

/** Format a timestamp given as seconds since the epoch or ISO text. */
export function formatTime(ts: string | number | null | undefined): string {
  if (ts === null || ts === undefined || ts === '') {
    return '';
  }
  const date =
    typeof ts === 'number'
      ? new Date(ts < 1e12 ? ts * 1000 : ts)
      : new Date(ts);
  return Number.isNaN(date.getTime()) ? String(ts) : date.toLocaleString();
}
