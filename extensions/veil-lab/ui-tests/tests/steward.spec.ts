/**
 * A data steward: the desk lists the pending application with its review rule; approving it with a
 * comment creates the grant, which the budgets tab then shows.
 */
import { expect, test } from '@jupyterlab/galata';

test.use({ autoGoto: true });

test('a steward approves an application from the desk and sees the grant', async ({
  page
}) => {
  await page.waitForFunction(() =>
    window.jupyterapp.commands.isEnabled('veil:steward-desk')
  );
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:steward-desk');
  });
  const desk = page.locator('#veil-steward-desk');
  const card = desk.locator('.veil-application').first();
  await expect(card).toContainText('bed planning', { timeout: 30000 });
  await expect(card).toContainText('other_project');
  expect(
    await desk.screenshot({ mask: [desk.locator('.veil-muted')] })
  ).toMatchSnapshot('steward-pending.png');

  await card.locator('.veil-comment').fill('bed planning: approved');
  await card.getByRole('button', { name: /Approve/ }).click();
  await expect(desk.locator('.veil-application')).toHaveCount(0, {
    timeout: 30000
  });

  await desk.getByRole('tab', { name: /Budgets/ }).click();
  const central = desk.locator('.veil-site[data-site="central"]');
  await expect(central).toContainText('other_project', { timeout: 30000 });
});
