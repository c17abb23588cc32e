/** A dataset's sharing model as the datasets panel shows it (DOM-free, so that jest can test it). */

export type Sharing = 'open' | 'controlled' | 'enclave';

export interface ISharingBadge {
  label: string;
  title: string;
  className: string;
}

const TITLES: Record<Sharing, string> = {
  open: 'open: DP statistics for any project on the site, and a published statistics sheet',
  controlled:
    "controlled: DP releases as the dataset's privacy level and its review rules allow",
  enclave:
    'enclave: no query results at all; train a model on it with DP-SGD under an approved grant'
};

/** The badge of a dataset's sharing model; a site too old to say one is "controlled", as it behaves. */
export function sharingBadge(sharing: string | undefined): ISharingBadge {
  const model: Sharing =
    sharing === 'open' || sharing === 'enclave' ? sharing : 'controlled';
  return {
    label: model,
    title: TITLES[model],
    className: `veil-sharing veil-sharing-${model}`
  };
}
