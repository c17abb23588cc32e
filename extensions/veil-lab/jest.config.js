/** Jest runs the unit tests of the DOM-free models with ts-jest. */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  testRegex: 'src/.*/__tests__/.*\\.spec\\.ts$|src/__tests__/.*\\.spec\\.ts$',
  transform: {
    '^.+\\.tsx?$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  },
  collectCoverageFrom: [
    'src/budgetModel.ts',
    'src/releaseHistory.ts',
    'src/standingModel.ts'
  ],
  coverageReporters: ['lcov', 'text'],
  reporters: ['default']
};
