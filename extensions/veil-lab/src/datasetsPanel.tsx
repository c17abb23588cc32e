/** Left sidebar: the study's sites and datasets, with mock previews. */
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import {
  apiPath,
  IDatasetInfo,
  IDatasetsResponse,
  IMockResponse,
  requestAPI,
  toApiError,
  VeilApiError
} from './api';
import { ErrorBox, formatValue, LevelBadge } from './components';
import { datasetsIcon } from './icons';
import { sharingBadge } from './sharing';

/** The code cell inserted by "Insert %%veil sql cell". */
export function sqlCellSource(site: string, dataset: string): string {
  return `%%veil sql --site ${site} --epsilon 0.1\nSELECT COUNT(*) AS n FROM ${dataset}`;
}

export type InsertCell = (source: string) => void;

function MockPreview(props: { site: string; dataset: string }): JSX.Element {
  const [mock, setMock] = React.useState<IMockResponse | null>(null);
  const [error, setError] = React.useState<VeilApiError | null>(null);
  const [loading, setLoading] = React.useState(false);

  const load = async () => {
    setLoading(true);
    setError(null);
    try {
      setMock(
        await requestAPI<IMockResponse>(
          `datasets/${apiPath(props.site, props.dataset)}/mock?rows=10`
        )
      );
    } catch (e) {
      setError(toApiError(e));
    } finally {
      setLoading(false);
    }
  };

  if (!mock) {
    return (
      <div className="veil-mock">
        <button
          className="jp-mod-styled veil-button"
          onClick={load}
          disabled={loading}
        >
          {loading ? 'Loading mock rows…' : 'Show mock preview'}
        </button>
        <ErrorBox error={error} />
      </div>
    );
  }
  return (
    <div className="veil-mock">
      <div className="veil-caption">Mock rows (synthetic, not real data)</div>
      <div className="veil-table-scroll">
        <table className="veil-table">
          <thead>
            <tr>
              {mock.columns.map(c => (
                <th key={c}>{c}</th>
              ))}
            </tr>
          </thead>
          <tbody>
            {mock.rows.map((row, i) => (
              <tr key={i}>
                {row.map((v, j) => (
                  <td key={j}>{formatValue(v)}</td>
                ))}
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </div>
  );
}

function SharingBadge(props: { sharing?: string }): JSX.Element {
  const badge = sharingBadge(props.sharing);
  return (
    <span className={badge.className} title={badge.title}>
      {badge.label}
    </span>
  );
}

/** Whether the site serves the dataset now (a site too old to say is taken as serving it). */
function serving(d: IDatasetInfo): boolean {
  return d.state === undefined || d.state === 'active';
}

function DatasetCard(props: {
  site: string;
  dataset: IDatasetInfo;
  insert: InsertCell;
}): JSX.Element {
  const { site, dataset: d } = props;
  return (
    <details className="veil-dataset" data-dataset={d.name}>
      <summary>
        <LevelBadge level={d.level} />
        <SharingBadge sharing={d.sharing} />
        {serving(d) ? null : (
          <span
            className="veil-state"
            title={`${d.state}: the site serves nothing from it now (a query says since when and why)`}
          >
            {d.state}
          </span>
        )}
        <span className="veil-dataset-name">{d.title || d.name}</span>
        <code className="veil-dataset-id">{d.name}</code>
      </summary>
      {d.description ? <p>{d.description}</p> : null}
      <dl className="veil-meta">
        <dt>Privacy unit</dt>
        <dd>{d.privacy_unit}</dd>
        <dt>Max rows per unit</dt>
        <dd>{formatValue(d.max_rows_per_unit)}</dd>
        <dt>Max rows</dt>
        <dd>{formatValue(d.max_rows)}</dd>
      </dl>
      <table className="veil-table veil-schema">
        <thead>
          <tr>
            <th>Column</th>
            <th>Type</th>
            <th>Bounds / categories</th>
          </tr>
        </thead>
        <tbody>
          {d.columns.map(c => (
            <tr key={c.name} title={c.description}>
              <td>{c.name}</td>
              <td>{c.dtype}</td>
              <td>
                {c.bounds
                  ? `[${c.bounds[0]}, ${c.bounds[1]}]`
                  : c.categories
                    ? c.categories.map(formatValue).join(', ')
                    : ''}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {d.sharing === 'enclave' || !serving(d) ? null : (
        <button
          className="jp-mod-styled jp-mod-accept veil-button"
          onClick={() => props.insert(sqlCellSource(site, d.name))}
        >
          Insert %%veil sql cell
        </button>
      )}
      <MockPreview site={site} dataset={d.name} />
    </details>
  );
}

function DatasetsView(props: { insert: InsertCell }): JSX.Element {
  const [data, setData] = React.useState<IDatasetsResponse | null>(null);
  const [error, setError] = React.useState<VeilApiError | null>(null);
  const [loading, setLoading] = React.useState(false);

  const refresh = React.useCallback(async () => {
    setLoading(true);
    setError(null);
    try {
      setData(await requestAPI<IDatasetsResponse>('datasets'));
    } catch (e) {
      setError(toApiError(e));
    } finally {
      setLoading(false);
    }
  }, []);

  React.useEffect(() => {
    void refresh();
  }, [refresh]);

  const sites = data ? Object.keys(data.sites ?? {}) : [];
  return (
    <div className="veil-panel-body">
      <div className="veil-toolbar">
        <h2>Veil datasets</h2>
        <button
          className="jp-mod-styled veil-button"
          onClick={refresh}
          disabled={loading}
        >
          {loading ? 'Loading…' : 'Refresh'}
        </button>
      </div>
      <ErrorBox error={error} />
      {data && sites.length === 0 ? (
        <p className="veil-empty">No sites are configured for this study.</p>
      ) : null}
      {sites.map(site => {
        const entry = data!.sites[site];
        return (
          <section className="veil-site" key={site} data-site={site}>
            <h3>{site}</h3>
            {entry.status !== 'ok' ? (
              <ErrorBox error={`${site} unreachable: ${entry.error}`} />
            ) : entry.datasets.length === 0 ? (
              <p className="veil-empty">No datasets offered.</p>
            ) : (
              entry.datasets.map(d => (
                <DatasetCard
                  key={d.name}
                  site={site}
                  dataset={d}
                  insert={props.insert}
                />
              ))
            )}
          </section>
        );
      })}
    </div>
  );
}

export class DatasetsPanel extends ReactWidget {
  constructor(private _insert: InsertCell) {
    super();
    this.id = 'veil-datasets';
    this.title.icon = datasetsIcon;
    this.title.caption = 'Veil datasets';
    this.addClass('veil-panel');
  }

  render(): JSX.Element {
    return <DatasetsView insert={this._insert} />;
  }
}
