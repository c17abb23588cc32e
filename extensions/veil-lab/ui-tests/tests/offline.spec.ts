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
  // the theme's error colours, as the browser computes them (a pixel snapshot of this item was flaky: its
  // box is 15 or 16 px high depending on sub-pixel layout)
  const [background, text] = await page.evaluate(() => {
    const probe = document.createElement('div');
    probe.style.backgroundColor = 'var(--jp-error-color3)';
    probe.style.color = 'var(--jp-error-color0)';
    document.body.appendChild(probe);
    const style = getComputedStyle(probe);
    const colours = [style.backgroundColor, style.color];
    probe.remove();
    return colours;
  });
  await expect(status).toHaveCSS('background-color', background);
  await expect(status).toHaveCSS('color', text);
});
