"""Staged rollouts (issue 15): signed plans, cohorts and phase decisions, as pure functions.

Nothing here does I/O or reads a clock: the dashboard, the gateways and the
robots pass bytes, counts and `now`, and so reach the same decisions from the
same inputs. Bad input raises `plan.PlanError` (a MalformedMetadata); a plan
that must not be believed raises `signed.UntrustedPlan`. No daemon uses this
package yet.
"""
