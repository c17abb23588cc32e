/**
 * Galata in Debian's Chromium (no browser download), one worker, video off (it needs Playwright's own
 * ffmpeg). The Jupyter server is started by Playwright with the environment tests/test_lab_ui.py gives
 * it: the study and steward configs of three running executors, and the `veil` kernelspec.
 */
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

module.exports = {
  ...baseConfig,
  workers: 1,
  retries: 0,
  timeout: 120000,
  expect: { timeout: 30000, toHaveScreenshot: { maxDiffPixelRatio: 0.02 } },
  use: {
    ...baseConfig.use,
    video: 'off',
    trace: 'retain-on-failure',
    launchOptions: {
      executablePath: process.env.VEIL_CHROMIUM || '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run'
      ]
    }
  },
  webServer: {
    command: 'jlpm start',
    url: 'http://localhost:8888/lab',
    timeout: 120 * 1000,
    reuseExistingServer: false
  }
};
