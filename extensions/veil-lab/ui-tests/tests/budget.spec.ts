/**
 * A researcher: a notebook on the Veil kernel, a live query, the status bar's budget drops by its cost
 * and the release shows in the history with a receipt the site confirms.
 */
import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';

const SQL =
  '%%veil sql --site north --epsilon 0.5\nSELECT COUNT(*) AS n FROM patients';

/**
 * What the status bar should show for north: the largest next release that fits on any of its active
 * grants, from the server (a release is on one dataset: these are never added up).
 */
async function northLargestNext(page: IJupyterLabPageFixture): Promise<string> {
  const response = await page.request.get('/veil/api/budget');
  const state = await response.json();
  const grants = state.sites.north.grants.filter(
    (g: any) => g.status === 'active'
  );
  const largest = Math.min(
    ...grants.map((g: any) => g.largest_next_epsilon as number)
  );
  return (Math.floor(largest * 100) / 100).toFixed(2);
}

function north(text: string | null): number {
  const match = /north:? (?:ε )?([0-9.]+)/.exec(text ?? '');
  if (!match) {
    throw new Error(`no budget for north in the status bar: ${text}`);
  }
  return Number(match[1]);
}

test.use({ autoGoto: true });

test('the status bar budget drops by the cost of a live query', async ({
  page
}) => {
  await page.notebook.createNew('budget.ipynb', { kernel: 'veil' });
  const status = page.locator('.veil-budget');
  await expect(status).toContainText('north', { timeout: 60000 });
  const before = north(await status.textContent());

  await page.notebook.setCell(0, 'code', '%veil mode live');
  await page.notebook.addCell('code', SQL);
  await page.notebook.run();
  await expect(page.locator('.jp-OutputArea-output').last()).toContainText(
    'receipt',
    { timeout: 60000 }
  );
  // the kernel's release event makes the status bar refetch: it drops to the site's new largest next release
  await expect(status).toContainText('for the next release');
  await expect
    .poll(async () => north(await status.textContent()), { timeout: 30000 })
    .toBeLessThan(before);
  await expect(status).toContainText(`north ${await northLargestNext(page)}`);
  expect(await status.screenshot()).toMatchSnapshot(
    'status-bar-after-query.png'
  );

  await status.click(); // opens the release history
  const release = page.locator('#veil-releases .veil-release');
  await expect(release).toHaveCount(1);
  await expect(release).toContainText('north');
  await expect(release).toContainText('patients');
  await expect(release.locator('.veil-verify-ok')).toBeVisible({
    timeout: 30000
  });
  expect(
    await page
      .locator('#veil-releases')
      .screenshot({ mask: [page.locator('.veil-release-receipt')] })
  ).toMatchSnapshot('release-history.png');
});

test('the datasets panel lists each site and inserts a query cell', async ({
  page
}) => {
  await page.notebook.createNew('datasets.ipynb', { kernel: 'veil' });
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:show-datasets');
  });
  const panel = page.locator('#veil-datasets');
  await expect(panel).toContainText('north', { timeout: 30000 });
  await expect(panel).toContainText('encounters');
  await panel.locator('summary', { hasText: 'encounters' }).first().click(); // open the dataset's details
  await panel
    .getByRole('button', { name: /Insert %%veil sql cell/ })
    .first()
    .click();
  await expect(page.locator('.jp-Cell').last()).toContainText(
    '%%veil sql --site'
  );
});
