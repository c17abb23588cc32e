/**
 * Interrupt that works: a three-site release while one site hangs (its executor is stopped with SIGSTOP
 * by this spec, the pid from tests/test_lab_ui.py). Interrupting the kernel ends the cell at once:
 * the two sites' releases that completed are shown above a one-line VeilInterrupted, which says the hung
 * site's request was cut off. The Python side checks that the hung site charged nothing once it woke.
 */
import { expect, test } from '@jupyterlab/galata';

const FROZEN = Number(process.env.VEIL_FREEZE_PID);

test.use({ autoGoto: true });

test('interrupting a release while a site hangs keeps what completed', async ({
  page
}) => {
  expect(FROZEN).toBeGreaterThan(0);
  await page.notebook.createNew('interrupt.ipynb', { kernel: 'veil' });
  await page.notebook.setCell(
    0,
    'code',
    "%veil mode live\nds = study.dataset('patients')"
  );
  await page.notebook.addCell(
    'code',
    "r = ds.sql('SELECT COUNT(*) AS n FROM patients').release(epsilon=0.05)"
  );
  await page.notebook.runCell(0, true); // in place: the release cell stays cell 1
  process.kill(FROZEN, 'SIGSTOP');
  try {
    await page.notebook.selectCells(1);
    await page.evaluate(() => {
      void window.jupyterapp.commands.execute('notebook:run-cell');
    });
    const outputs = page
      .locator('.jp-Notebook .jp-Cell')
      .nth(1)
      .locator('.jp-OutputArea-output');
    // north and central answer within a second; their releases are shown when the cell ends
    await page.waitForTimeout(5000);
    await expect(outputs).toHaveCount(0);
    // the Interrupt button's request, sent to the server directly: Galata's interception of the kernels API
    // cannot parse its empty answer
    const kernel = await page.evaluate(
      () =>
        (window.jupyterapp.shell.currentWidget as any).sessionContext.session
          .kernel.id
    );
    const interrupted = await page.request.post(
      `/api/kernels/${kernel}/interrupt`
    );
    expect(interrupted.status()).toBe(204);
    await expect(outputs).toHaveCount(3, { timeout: 30000 });
    await expect(outputs.nth(0)).toContainText('north');
    await expect(outputs.nth(1)).toContainText('central');
    const error = outputs.nth(2);
    await expect(error).toContainText('VeilInterrupted');
    await expect(error).toContainText("site 'valley' did not confirm");
    expect((await error.innerText()).trim().split('\n')).toHaveLength(1);
  } finally {
    process.kill(FROZEN, 'SIGCONT');
  }
});
