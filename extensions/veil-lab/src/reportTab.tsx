/**
 * The steward desk's Report tab: a site's usage and value report for a
 * period (per dataset and project: applications, releases, cost, models,
 * federated rounds, refusals, grants left) and a chart of the cumulative
 * epsilon spent per dataset.
 */
import * as React from 'react';

import { requestAPI, toApiError, VeilApiError } from './api';
import { formatEpsilon } from './budgetModel';
import { ErrorBox, formatTime } from './components';
import {
  chartOf,
  IDatasetTimeline,
  IReportLine,
  IUsageReport,
  lineName,
  NO_REPORT_FILTERS,
  REPORT_FILTERS,
  ReportFilters,
  reportQuery
} from './reportModel';

const CHART_WIDTH = 480;
const CHART_HEIGHT = 160;
const COLORS = [
  '#1f77b4',
  '#d62728',
  '#2ca02c',
  '#9467bd',
  '#ff7f0e',
  '#8c564b'
];

/** Cumulative epsilon spent per dataset over the report's period (SVG). */
export function EpsilonChart(props: {
  timelines: IDatasetTimeline[];
}): JSX.Element | null {
  const chart = chartOf(props.timelines, CHART_WIDTH, CHART_HEIGHT);
  if (chart === null) {
    return null;
  }
  return (
    <figure className="veil-report-chart">
      <svg
        role="img"
        aria-label="Cumulative epsilon spent per dataset"
        viewBox={`-40 -10 ${CHART_WIDTH + 50} ${CHART_HEIGHT + 30}`}
        width={CHART_WIDTH + 50}
        height={CHART_HEIGHT + 30}
      >
        <line
          x1={0}
          y1={CHART_HEIGHT}
          x2={CHART_WIDTH}
          y2={CHART_HEIGHT}
          stroke="currentColor"
        />
        <line x1={0} y1={0} x2={0} y2={CHART_HEIGHT} stroke="currentColor" />
        <text x={-4} y={4} textAnchor="end" fontSize={10}>
          {formatEpsilon(chart.top)}
        </text>
        <text x={-4} y={CHART_HEIGHT} textAnchor="end" fontSize={10}>
          0
        </text>
        <text x={0} y={CHART_HEIGHT + 14} fontSize={10}>
          {formatTime(chart.start)}
        </text>
        <text
          x={CHART_WIDTH}
          y={CHART_HEIGHT + 14}
          textAnchor="end"
          fontSize={10}
        >
          {formatTime(chart.end)}
        </text>
        {chart.lines.map((line, i) => (
          <polyline
            key={line.dataset}
            data-dataset={line.dataset}
            points={line.points}
            fill="none"
            stroke={COLORS[i % COLORS.length]}
            strokeWidth={2}
          >
            <title>{`${line.dataset}: ε ${formatEpsilon(line.last)} spent`}</title>
          </polyline>
        ))}
      </svg>
      <figcaption>
        {chart.lines.map((line, i) => (
          <span
            key={line.dataset}
            style={{ color: COLORS[i % COLORS.length], marginRight: '1em' }}
          >
            ■ {line.dataset} (ε {formatEpsilon(line.last)})
          </span>
        ))}
      </figcaption>
    </figure>
  );
}

function ReportRow(props: { line: IReportLine }): JSX.Element {
  const l = props.line;
  const apps = l.applications
    .map(a => `#${a.id} ${a.status}${a.ethics_ref ? ` (${a.ethics_ref})` : ''}`)
    .join(', ');
  const reviewers = l.applications
    .flatMap(a =>
      a.reviews.map(r => `${r.reviewer} (${r.office ?? 'steward'})`)
    )
    .join(', ');
  return (
    <tr>
      <td>{lineName(l)}</td>
      <td title={reviewers}>{apps}</td>
      <td>{l.releases}</td>
      <td title={`rho ${l.spent.rho}`}>{formatEpsilon(l.spent.epsilon)}</td>
      <td>{l.models.length || ''}</td>
      <td>
        {l.studies.map(s => `${s.study}: ${s.round}/${s.rounds}`).join(', ')}
      </td>
      <td>{l.refusals.map(r => `${r.code} ×${r.count}`).join(', ')}</td>
      <td>{l.grant ? formatEpsilon(l.grant.largest_next_epsilon) : ''}</td>
      <td title={l.receipts.map(r => r.receipt).join('\n')}>
        {l.receipts.length || ''}
      </td>
    </tr>
  );
}

export function ReportTab(props: { sites: string[] }): JSX.Element {
  const [site, setSite] = React.useState(props.sites[0] ?? '');
  const [filters, setFilters] =
    React.useState<ReportFilters>(NO_REPORT_FILTERS);
  const [report, setReport] = React.useState<IUsageReport | null>(null);
  const [error, setError] = React.useState<VeilApiError | null>(null);
  const [loading, setLoading] = React.useState(false);
  const load = async (): Promise<void> => {
    setLoading(true);
    setError(null);
    try {
      setReport(
        await requestAPI<IUsageReport>(
          `steward/report?${reportQuery(site, filters)}`
        )
      );
    } catch (e) {
      setError(toApiError(e));
    } finally {
      setLoading(false);
    }
  };
  return (
    <div>
      <form
        className="veil-toolbar"
        onSubmit={e => {
          e.preventDefault();
          void load();
        }}
      >
        <h3>Report</h3>
        <select
          aria-label="Site"
          value={site}
          onChange={e => setSite(e.target.value)}
        >
          {props.sites.map(s => (
            <option key={s} value={s}>
              {s}
            </option>
          ))}
        </select>
        {REPORT_FILTERS.map(key => (
          <input
            key={key}
            className="veil-filter"
            type={key === 'since' || key === 'until' ? 'date' : 'search'}
            aria-label={key}
            placeholder={key}
            title={key === 'until' ? 'until (excluded)' : key}
            value={filters[key]}
            onChange={e => setFilters({ ...filters, [key]: e.target.value })}
          />
        ))}
        <button
          type="submit"
          className="jp-mod-styled veil-button"
          disabled={loading}
        >
          {loading ? 'Loading…' : 'Show report'}
        </button>
      </form>
      <ErrorBox error={error} />
      {report ? (
        <div className="veil-report">
          <p className="veil-muted">
            {`${report.site}: from ${report.since ? formatTime(report.since) : 'the start'} until ` +
              `${formatTime(report.until)} (excluded), audit log up to entry ${report.audit_seq}; ` +
              `ε at the site's reporting delta ${report.reporting_delta}`}
          </p>
          <EpsilonChart timelines={report.timelines} />
          <div className="veil-table-scroll">
            <table className="veil-table">
              <thead>
                <tr>
                  <th>Project, dataset</th>
                  <th>Applications</th>
                  <th>Releases</th>
                  <th title="spent in the period, at the reporting delta (rho added up)">
                    ε spent
                  </th>
                  <th>Models</th>
                  <th>Federated rounds</th>
                  <th>Refusals</th>
                  <th title="the grant's largest next release, now">ε left</th>
                  <th>Receipts</th>
                </tr>
              </thead>
              <tbody>
                {report.lines.map(l => (
                  <ReportRow key={`${l.dataset}/${l.project}`} line={l} />
                ))}
              </tbody>
            </table>
          </div>
        </div>
      ) : null}
    </div>
  );
}
