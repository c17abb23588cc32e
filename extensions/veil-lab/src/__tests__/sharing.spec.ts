import { sharingBadge } from '../sharing';

describe('sharingBadge', () => {
  it('names each sharing model with what it allows', () => {
    expect(sharingBadge('open').label).toBe('open');
    expect(sharingBadge('enclave').title).toMatch(/no query results/);
    expect(sharingBadge('enclave').className).toBe(
      'veil-sharing veil-sharing-enclave'
    );
  });

  it('reads a site that says nothing as controlled', () => {
    expect(sharingBadge(undefined).label).toBe('controlled');
    expect(sharingBadge('controlled').title).toMatch(/review rules/);
  });
});
