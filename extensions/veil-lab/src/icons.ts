import { LabIcon } from '@jupyterlab/ui-components';

const veilSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2 3 6v6c0 5 3.8 9.7 9 10 5.2-.3 9-5 9-10V6l-9-4zm0 2.2 7 3.1V12c0 3.9-2.9 7.6-7 8-4.1-.4-7-4.1-7-8V7.3l7-3.1z"/>
    <path d="M7.5 10.5h9v1.6h-9zm1.5 3h6v1.6H9z"/>
  </g>
</svg>`;

/** The Veil shield icon used by the sidebar panels and the steward desk. */
export const veilIcon = new LabIcon({ name: 'veil-lab:veil', svgstr: veilSvg });
