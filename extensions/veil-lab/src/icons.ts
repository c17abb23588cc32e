import { LabIcon } from '@jupyterlab/ui-components';

const veilSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2 3 6v6c0 5 3.8 9.7 9 10 5.2-.3 9-5 9-10V6l-9-4zm0 2.2 7 3.1V12c0 3.9-2.9 7.6-7 8-4.1-.4-7-4.1-7-8V7.3l7-3.1z"/>
    <path d="M7.5 10.5h9v1.6h-9zm1.5 3h6v1.6H9z"/>
  </g>
</svg>`;

/** The Veil shield: the notebook toolbar's mode item and the launcher. */
export const veilIcon = new LabIcon({ name: 'veil-lab:veil', svgstr: veilSvg });

const datasetsSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2C7 2 4 3.6 4 5.5v13C4 20.4 7 22 12 22s8-1.6 8-3.5v-13C20 3.6 17 2 12 2zm0 2c3.9 0 6 1.1 6 1.5S15.9 7 12 7 6 5.9 6 5.5 8.1 4 12 4zM6 8c1.5.7 3.6 1 6 1s4.5-.3 6-1v3.5c0 .4-2.1 1.5-6 1.5s-6-1.1-6-1.5V8zm0 6c1.5.7 3.6 1 6 1s4.5-.3 6-1v4.5c0 .4-2.1 1.5-6 1.5s-6-1.1-6-1.5V14z"/>
  </g>
</svg>`;

const historySvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M13 3a9 9 0 0 0-9 9H1l3.9 3.9L9 12H6a7 7 0 1 1 2.1 5l-1.4 1.4A9 9 0 1 0 13 3zm-1 5v5l4.3 2.5.7-1.2-3.5-2.1V8H12z"/>
  </g>
</svg>`;

const deskSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2 3 6v6c0 5 3.8 9.7 9 10 5.2-.3 9-5 9-10V6l-9-4zm-1.2 14.2-3.6-3.6 1.4-1.4 2.2 2.2 5-5 1.4 1.4-6.4 6.4z"/>
  </g>
</svg>`;

/** The datasets panel (left sidebar): a database. */
export const datasetsIcon = new LabIcon({
  name: 'veil-lab:datasets',
  svgstr: datasetsSvg
});

/** The release history panel (right sidebar): a clock going back. */
export const historyIcon = new LabIcon({
  name: 'veil-lab:history',
  svgstr: historySvg
});

/** The steward desk: a shield with a check mark. */
export const deskIcon = new LabIcon({ name: 'veil-lab:desk', svgstr: deskSvg });

const standingSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M7 2h2v2h6V2h2v2h3a1 1 0 0 1 1 1v15a1 1 0 0 1-1 1H4a1 1 0 0 1-1-1V5a1 1 0 0 1 1-1h3V2zM5 9v10h14V9H5zm1.6 6.6 2.5-3.3 2.3 2 2.7-3.8 2.3 2.6 1.1-1 .9 1-2 1.9-2.2-2.5-2.6 3.7-2.3-2-1.6 2.2-1.1-.8z"/>
  </g>
</svg>`;

/** The standing queries panel (left sidebar): a calendar with a series over its windows. */
export const standingIcon = new LabIcon({
  name: 'veil-lab:standing',
  svgstr: standingSvg
});
