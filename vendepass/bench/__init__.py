"""
C{vendepass-bench}: a load generator and invariant checker for a running
VendePass server (see docs/performance.md).

- L{vendepass.bench.generator}: the lean per-customer protocol, connections, latencies;
- L{vendepass.bench.scenarios}: buy, flash-sale, browse, idle, ceiling, check;
- L{vendepass.bench.checks}: the invariants, through the protocol and C{vendepass-admin verify};
- L{vendepass.bench.echo}: the ceiling's echo server;
- L{vendepass.bench.report}: the report, as text and JSON;
- L{vendepass.bench.cli}: the command line.
"""
