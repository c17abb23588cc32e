/**
 * Standing queries: the panel first says how to set one up; a researcher files one from a notebook
 * (`study.standing(...)`, at north only), a steward approves it (encounters is L2), and the panel lists it
 * under north with its windows, its next release (relative, and absolute in UTC) and its budget, charged
 * once, up front; the other sites say they have none.
 */
import { expect, test } from '@jupyterlab/galata';

/** Today in UTC: the standing query's first window starts today, so window 1 is released in 7 days. */
const START = new Date().toISOString().slice(0, 10);

/** The ISO date `days` after START. */
function startPlus(days: number): string {
  return new Date(Date.parse(`${START}T00:00:00Z`) + days * 86_400_000)
    .toISOString()
    .slice(0, 10);
}

const SETUP = `filed = study.standing('visits_weekly', 'SELECT COUNT(*) FROM encounters', 'encounter_date',
                       '${START}', epsilon=1.0, max_windows=2, horizon=8,
                       purpose='Weekly visits, for surveillance', sites=['north'])
print({site: (a.id, a.status) for site, a in filed.items()})`;

test.use({ autoGoto: true });

test('the panel lists a standing query with its next release', async ({
  page
}) => {
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:show-standing');
  });
  const panel = page.locator('#veil-standing');
  const empty = panel.locator('.veil-standing-empty');
  await expect(empty).toContainText('No standing queries yet', {
    timeout: 30000
  });
  await expect(empty).toContainText('study.standing(');
  await expect(empty).toContainText('tutorial 6');

  // a researcher files it from a notebook (a standing query is filed in live mode)
  await page.notebook.createNew('standing.ipynb', { kernel: 'veil' });
  await page.notebook.setCell(0, 'code', '%veil mode live');
  await page.notebook.runCell(0, true);
  await page.notebook.addCell('code', SETUP);
  await page.notebook.runCell(1, true);
  await expect(
    page.locator('.jp-Cell').nth(1).locator('.jp-OutputArea-output')
  ).toContainText("'north'", { timeout: 60000 });

  // a steward approves it, through the lab's steward API (the desk's own spec drives the buttons)
  const listed = await page.request.get(
    '/veil/api/steward/applications?status=pending'
  );
  const pending = (await listed.json()).sites.north.applications.filter(
    (a: any) => [a.request.uses].flat().includes('surveillance')
  );
  expect(pending).toHaveLength(1);
  const review = await page.request.post(
    `/veil/api/steward/applications/north/${pending[0].id}/reviews`,
    {
      data: {
        decision: 'approve',
        comment: 'weekly visits: approved',
        version: pending[0].version
      }
    }
  );
  expect(review.ok(), await review.text()).toBe(true);

  // the panel lists it under north once refreshed (it polls too, on the budget's interval)
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:show-standing');
  });
  await panel.getByRole('button', { name: 'Refresh' }).click();
  const card = panel.locator(
    '.veil-site[data-site="north"] .veil-standing[data-name="visits_weekly"]'
  );
  await expect(card).toBeVisible({ timeout: 30000 });
  await expect(card).toContainText('encounters');
  await expect(card.locator('.veil-standing-status')).toHaveText('active');
  await expect(card.locator('.veil-standing-progress')).toHaveText(
    '0 / 8 windows'
  );
  await expect(card.locator('.veil-standing-next')).toHaveText(
    new RegExp(`^window 1 in [67] days \\(${startPlus(7)} 00:00 UTC\\)$`)
  );
  const budget = card.locator('.veil-standing-budget');
  await expect(budget).toContainText(/ε 1(\.00)? /); // the whole horizon's certified loss, at most the asked 1
  await expect(budget).toHaveAttribute(
    'title',
    /charged once, up front, for all 8 windows/
  );
  await expect(card.locator('.veil-standing-last')).toHaveText('none yet');
  for (const site of ['central', 'valley']) {
    await expect(
      panel.locator(`.veil-site[data-site="${site}"]`)
    ).toContainText('No standing queries at this site.');
  }
});
