/**
 * A researcher: a notebook on the Veil kernel shows MOCK, then LIVE after `%veil mode live`; a live query
 * makes the status bar's budget drop by its cost; the release shows in the history with its cost, the
 * grant after it (the same granted / spent / largest next release as the status bar and the steward
 * desk) and a receipt the site confirms; a refusal reads in one line; a release assigned to a variable
 * (never displayed) is still in the history after a page reload, and an entry's click selects its cell.
 */
import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';

const SQL =
  '%%veil sql --site north --epsilon 0.5\nSELECT COUNT(*) AS n FROM patients';

/** A release assigned to a variable: never displayed, so only the comm event and the metadata know it. */
const UNDISPLAYED =
  "enc = study.sites['north'].datasets['patients'].sql('SELECT COUNT(*) AS n FROM patients').release(epsilon=0.2)";

/** SELECT * is refused by the site (no DP release of raw rows). */
const REFUSED = '%%veil sql --site north --epsilon 0.1\nSELECT * FROM patients';

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

test('mode, budget, history and desk agree on a live release', async ({
  page
}) => {
  await page.notebook.createNew('budget.ipynb', { kernel: 'veil' });
  const status = page.locator('.veil-budget');
  await expect(status).toContainText('north', { timeout: 60000 });
  const before = north(await status.textContent());

  // MOCK at start, in the status bar and in the notebook's toolbar; LIVE after %veil mode live
  const barMode = page.locator('.veil-budget-status .veil-mode');
  const toolbarMode = page.locator(
    '.jp-NotebookPanel .veil-mode-toolbar .veil-mode'
  );
  await expect(barMode).toHaveText('MOCK');
  await expect(toolbarMode).toHaveText('MOCK');
  await expect(toolbarMode).toHaveClass(/veil-mode-mock/);
  await page.notebook.setCell(0, 'code', '%veil mode live');
  await page.notebook.runCell(0, true);
  await expect(barMode).toHaveText('LIVE');
  await expect(toolbarMode).toHaveText('LIVE');
  await expect(toolbarMode).toHaveClass(/veil-mode-live/);

  await page.notebook.addCell('code', SQL);
  await page.notebook.runCell(1, true);
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
  expect(
    await page.locator('.veil-budget-status').screenshot()
  ).toMatchSnapshot('status-bar-after-query.png');

  await status.click(); // opens the release history
  const history = page.locator('#veil-releases');
  const release = history.locator('.veil-release');
  await expect(release).toHaveCount(1);
  await expect(release).toContainText('north');
  await expect(release).toContainText('patients');
  await expect(release).toContainText('ε 0.5');
  await expect(release.locator('.veil-verify-ok')).toBeVisible({
    timeout: 30000
  });
  await expect(history).toContainText('their epsilons do not add up');
  expect(
    await history.screenshot({ mask: [page.locator('.veil-release-receipt')] })
  ).toMatchSnapshot('release-history.png');

  // the same figures in the history (the grant after the release), the status bar and the desk
  const figures = await history
    .locator(
      '.veil-grant-state[data-site="north"][data-dataset="patients"] .veil-grant-figures'
    )
    .textContent();
  const m =
    /granted ε ([0-9.]+) · spent ([0-9.]+) · largest next release ([0-9.]+)/.exec(
      figures ?? ''
    );
  expect(m, `history figures: ${figures}`).not.toBeNull();
  const [, granted, spent, next] = m!;
  await expect(status).toHaveAttribute(
    'title',
    new RegExp(
      `north/patients: ε granted ${granted}, spent ${spent}, largest next release ${next}`.replace(
        /\./g,
        '\\.'
      )
    )
  );
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:steward-desk');
  });
  const desk = page.locator('#veil-steward-desk');
  await desk.getByRole('tab', { name: /Budgets/ }).click();
  const row = desk
    .locator('.veil-site[data-site="north"] .veil-card')
    .filter({
      has: page.locator('.veil-card-head strong', { hasText: /^patients$/ })
    })
    .locator('tbody tr', { hasText: 'study1' });
  await expect(row.locator('td').nth(2)).toHaveText(granted);
  await expect(row.locator('td').nth(3)).toHaveText(spent);
  await expect(row.locator('td').nth(4)).toHaveText(next);
  await page.notebook.activate('budget.ipynb');

  // a refusal reads in one line: class, code, message and what to do
  await page.notebook.addCell('code', REFUSED);
  await page.notebook.runCell(2, true);
  const refusal = page
    .locator('.jp-Cell')
    .nth(2)
    .locator('.jp-OutputArea-output');
  await expect(refusal).toContainText('What to do', { timeout: 60000 });
  await expect(refusal).toContainText(/^\w+Error \[\w+\]: .+\. What to do: /);
  expect((await refusal.innerText()).trim().split('\n')).toHaveLength(1);

  // a release never displayed is kept in the notebook's metadata: still in the history after a reload
  await page.notebook.addCell('code', UNDISPLAYED);
  await page.notebook.runCell(3, true);
  await expect(release).toHaveCount(2, { timeout: 60000 });
  await page.notebook.save();
  // (no Launcher after the reload: the notebook is restored, so Galata's own readiness check does not apply)
  await page.reload({ waitForIsReady: false });
  await expect(page.locator('#jupyterlab-splash')).toHaveCount(0);
  await expect(
    page.locator('.jp-NotebookPanel .jp-Cell').first()
  ).toBeVisible();
  // the kernel (the same one, or a new one when the session did not follow Galata's rename) says its mode
  await expect(barMode).toHaveText(/^(MOCK|LIVE)$/);
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:show-releases');
  });
  await expect(release).toHaveCount(2, { timeout: 30000 });
  await expect(history.locator('.veil-release-unshown')).toHaveCount(1);
  await expect(history.locator('.veil-release-unshown')).toContainText(
    'not displayed'
  );
  // clicking the shown release selects the cell whose output holds it
  await history.locator('.veil-release-shown').click();
  await expect(page.locator('.jp-Cell.jp-mod-active')).toContainText(
    'SELECT COUNT(*) AS n FROM patients'
  );
  await expect(page.locator('.jp-Cell.jp-mod-active')).toContainText(
    '%%veil sql'
  );

  // back in mock mode: the toolbar says the outputs' live releases will not be reproduced
  await page.notebook.addCell('code', '%veil mode mock');
  await page.notebook.runCell(4, true);
  await expect(toolbarMode).toHaveText('MOCK', { timeout: 60000 });
  await expect(barMode).toHaveText('MOCK');
  const notice = page.locator('.jp-NotebookPanel .veil-live-notice');
  await expect(notice).toContainText('live outputs');
  await expect(notice).toHaveAttribute('title', /outputs hold live releases/);
  // the notice is short: the notebook's own buttons stay in its toolbar, not in "More commands"
  await expect(
    page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="insert"]')
  ).toBeVisible();
});

test('the datasets panel lists each site, fits the sidebar and inserts a query cell', async ({
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
  // no horizontal overflow at the default sidebar width
  expect(
    await panel.evaluate(node => node.scrollWidth - node.clientWidth)
  ).toBeLessThanOrEqual(1);
  await panel
    .getByRole('button', { name: /Insert %%veil sql cell/ })
    .first()
    .click();
  await expect(page.locator('.jp-Cell').last()).toContainText(
    '%%veil sql --site'
  );
});
