/**
 * The steward desk's usage and value report (`GET /report` at a site, the
 * wire model `veil.usage.UsageReport`): its query string, and the geometry of
 * the chart of cumulative epsilon spent per dataset (plain SVG, no library).
 */

export interface ITimelinePoint {
  ts: string;
  epsilon: number;
  seq: number;
}

export interface IDatasetTimeline {
  dataset: string;
  points: ITimelinePoint[];
}

export interface IReportApplication {
  id: number;
  applicant: string;
  status: string;
  version: number;
  purpose: string;
  ethics_ref: string | null;
  epsilon: number;
  reviews: { reviewer: string; office: string | null; decision: string }[];
}

export interface IReportLine {
  dataset: string | null;
  project: string | null;
  applications: IReportApplication[];
  releases: number;
  spent: {
    rho: number;
    approx_epsilon: number;
    delta: number;
    epsilon: number;
  };
  receipts: {
    seq: number;
    ts: string;
    action: string;
    epsilon: number;
    receipt: string;
  }[];
  models: { job: number; epsilon: number }[];
  studies: {
    job: number;
    study: string;
    round: number;
    rounds: number;
    epsilon: number;
    rows: number | null;
  }[];
  refusals: { code: string; count: number }[];
  grant: {
    epsilon: number;
    epsilon_spent: number;
    largest_next_epsilon: number;
    status: string;
  } | null;
}

export interface IUsageReport {
  site: string;
  since: string | null;
  until: string;
  reporting_delta: number;
  project: string | null;
  dataset: string | null;
  audit_seq: number;
  lines: IReportLine[];
  timelines: IDatasetTimeline[];
  budgets: {
    dataset: string;
    level: string;
    cap_epsilon: number;
    spent_epsilon: number;
    largest_next_epsilon: number;
  }[];
  anonymous_refusals: { code: string; count: number }[];
}

export const REPORT_FILTERS = ['since', 'until', 'dataset', 'project'] as const;
export type ReportFilters = Record<(typeof REPORT_FILTERS)[number], string>;
export const NO_REPORT_FILTERS: ReportFilters = {
  since: '',
  until: '',
  dataset: '',
  project: ''
};

/** The query string for a site's report: the site, then non-empty filters. */
export function reportQuery(site: string, filters: ReportFilters): string {
  const params = new URLSearchParams({ site });
  for (const key of REPORT_FILTERS) {
    const value = filters[key].trim();
    if (value) {
      params.set(key, value);
    }
  }
  return params.toString();
}

/** One dataset's line in the chart: SVG polyline points ("x,y x,y ..."). */
export interface IChartLine {
  dataset: string;
  points: string;
  last: number;
}

export interface IChart {
  lines: IChartLine[];
  /** The epsilon at the top of the chart (the largest cumulative spend). */
  top: number;
  start: string;
  end: string;
}

/**
 * Cumulative epsilon over time as step lines in a `width` x `height` box:
 * time runs left to right across every dataset's points, epsilon from 0
 * (bottom) to the largest spend (top). A spend holds until the next charge,
 * and every line runs on to the right edge (the report's end).
 */
export function chartOf(
  timelines: IDatasetTimeline[],
  width: number,
  height: number
): IChart | null {
  const all = timelines.flatMap(t => t.points);
  if (all.length === 0) {
    return null;
  }
  const times = all.map(p => Date.parse(p.ts));
  const t0 = Math.min(...times);
  const span = Math.max(...times) - t0 || 1;
  const top = Math.max(...all.map(p => p.epsilon)) || 1;
  const x = (ts: string) => ((Date.parse(ts) - t0) / span) * width;
  const y = (epsilon: number) => height - (epsilon / top) * height;
  const fmt = (v: number) => Number(v.toFixed(1));
  const lines = timelines
    .filter(t => t.points.length > 0)
    .map(t => {
      const steps: string[] = [];
      t.points.forEach((p, i) => {
        if (i > 0) {
          steps.push(`${fmt(x(p.ts))},${fmt(y(t.points[i - 1].epsilon))}`);
        }
        steps.push(`${fmt(x(p.ts))},${fmt(y(p.epsilon))}`);
      });
      const last = t.points[t.points.length - 1].epsilon;
      steps.push(`${fmt(width)},${fmt(y(last))}`);
      return { dataset: t.dataset, points: steps.join(' '), last };
    });
  const ordered = [...all].sort((a, b) => Date.parse(a.ts) - Date.parse(b.ts));
  return {
    lines,
    top,
    start: ordered[0].ts,
    end: ordered[ordered.length - 1].ts
  };
}

/** "project p, dataset d" as a report line is named. */
export function lineName(line: IReportLine): string {
  const project = line.project ? `project ${line.project}` : "the site's own";
  return line.dataset
    ? `${project}, ${line.dataset}`
    : `${project}, no dataset`;
}
