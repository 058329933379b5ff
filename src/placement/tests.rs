//! Scenario tests of the placement engine.
