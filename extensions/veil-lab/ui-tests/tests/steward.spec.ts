/**
 * A data steward: the desk says who is signed in at each site and lists the pending applications with
 * their review rules; approving with a comment creates the grant; approving an application over a grant
 * the project already holds asks add / replace / keep; revoking asks for a reason (none: refused) in a
 * destructive dialog that names the site, project and dataset; a cap change is the Audit tab's newest
 * entry; the desk comes back after a page reload.
 */
import { expect, test } from '@jupyterlab/galata';

test.use({ autoGoto: true });

test('a steward reviews, revokes and changes a cap from the desk', async ({
  page
}) => {
  await page.waitForFunction(() =>
    window.jupyterapp.commands.isEnabled('veil:steward-desk')
  );
  await page.evaluate(async () => {
    await window.jupyterapp.commands.execute('veil:steward-desk');
  });
  const desk = page.locator('#veil-steward-desk');
  await expect(
    desk.locator('.veil-signed-in-site[data-site="central"]')
  ).toContainText('carol (steward', { timeout: 30000 });
  const card = desk
    .locator('.veil-application')
    .filter({ hasText: 'bed planning' });
  await expect(card).toContainText('other_project', { timeout: 30000 });
  expect(
    await desk.screenshot({ mask: [desk.locator('.veil-muted')] })
  ).toMatchSnapshot('steward-pending.png');

  await card.locator('.veil-comment').fill('bed planning: approved');
  await card.getByRole('button', { name: /Approve/ }).click();
  await expect(card).toHaveCount(0, { timeout: 30000 });

  // over the grant study1 already holds: the desk asks what to do with it
  const more = desk
    .locator('.veil-application')
    .filter({ hasText: 'Readmissions follow-up' });
  await expect(more).toContainText('The project already holds');
  await more.locator('.veil-comment').fill('follow-up: keep the grant');
  await more.getByRole('button', { name: /Approve/ }).click();
  const choice = page.locator('.jp-Dialog');
  await expect(choice).toContainText('already holds a grant');
  await expect(choice.getByRole('button', { name: 'Add' })).toBeVisible();
  await expect(choice.getByRole('button', { name: 'Replace' })).toBeVisible();
  await choice.getByRole('button', { name: 'Keep' }).click();
  await expect(more).toHaveCount(0, { timeout: 30000 });
  await expect(desk.locator('.veil-application')).toHaveCount(0);

  // revoke: destructive, names the site, project and dataset, and refuses an empty reason
  await desk.getByRole('tab', { name: /Budgets/ }).click();
  const central = desk.locator('.veil-site[data-site="central"]');
  const granted = central.locator('tbody tr', { hasText: 'other_project' });
  await expect(granted).toContainText('active', { timeout: 30000 });
  await granted.getByRole('button', { name: 'Revoke' }).click();
  const dialog = page.locator('.jp-Dialog');
  await expect(dialog).toContainText('at central: project other_project');
  await expect(dialog).toContainText('dataset encounters');
  const revoke = dialog.locator('.jp-Dialog-button.jp-mod-warn');
  await expect(revoke).toHaveText('Revoke');
  await expect(revoke).toBeDisabled();
  await dialog.locator('.veil-revoke-reason').fill('   ');
  await expect(revoke).toBeDisabled();
  await dialog.locator('.veil-revoke-reason').fill('project ended');
  await revoke.click();
  await expect(granted).toContainText('revoked', { timeout: 30000 });

  // a cap change is the newest entry of the audit log
  const card2 = central.locator('.veil-card').first();
  const dataset = await card2.locator('.veil-card-head strong').textContent();
  await card2.getByRole('button', { name: 'Change cap' }).click();
  const capDialog = page.locator('.jp-Dialog', { hasText: 'New lifetime' });
  const number = capDialog.locator('input');
  const cap = Number(await number.inputValue());
  await number.fill(String(Math.ceil(cap) + 7));
  await capDialog.getByRole('button', { name: 'Next' }).click();
  const reasonDialog = page.locator('.jp-Dialog', { hasText: 'Change cap of' });
  await reasonDialog.locator('input').fill('galata: annual review');
  await reasonDialog.getByRole('button', { name: 'Change cap' }).click();
  await expect(page.locator('.jp-Dialog')).toHaveCount(0);
  await expect(card2).toContainText(`cap ε ${(Math.ceil(cap) + 7).toFixed(2)}`);
  await desk.getByRole('tab', { name: /Audit/ }).click();
  const first = desk.locator('.veil-audit tbody tr').first();
  await expect(first).toContainText('galata: annual review', {
    timeout: 30000
  });
  await expect(first).toContainText('cap');
  await expect(first).toContainText(dataset ?? '');

  // the desk's tab is restored after a reload
  await page.reload({ waitForIsReady: false });
  await expect(page.locator('#veil-steward-desk')).toBeVisible({
    timeout: 30000
  });
});
