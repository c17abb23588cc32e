/**
 * An executor that is down: the status bar says which site is unreachable, in its error colour.
 */
import { expect, test } from '@jupyterlab/galata';

test.use({ autoGoto: true });

test('an unreachable executor is shown clearly', async ({ page }) => {
  await page.notebook.createNew('offline.ipynb', { kernel: 'veil' });
  const status = page.locator('.veil-budget');
  await expect(status).toContainText('valley unreachable', { timeout: 60000 });
  await expect(status).toHaveClass(/veil-budget-error/);
  expect(await status.screenshot()).toMatchSnapshot(
    'status-bar-unreachable.png'
  );
});
