#!/usr/bin/env python3
"""Where the CPU goes inside the clocked runs of `PIPELINE_ROUNDS=N cargo bench --bench
pipeline`, from a system-wide profile taken around it:

    perf record -a -k CLOCK_REALTIME -F 499 -o perf.data -- \\
        env PIPELINE_ROUNDS=6 target/release/deps/pipeline-<hash> --bench 2> pipeline.log
    scripts/perf-windows.py pipeline.log perf.data [--symbols]

The bench prints each round's end-to-end and bare all-chunks windows in Unix seconds; this
counts the samples inside them (`perf script`), by process and thread: the worker's model
threads (comm `rag-ingest`: its rayon pool), its embedding thread, its tokio threads, the
bench process, RabbitMQ (Erlang scheduler threads), idle (`swapper`), the rest. Printed:
the shares inside the end-to-end windows, and per round and in total the samples of both
windows, whose ratio (bare / end to end) is the pipeline's share of bare embedding on CPU
time. A round's ratio moves with the host's speed as the wall clock does; the shares inside
the windows do not, and the model's samples in the worker against those in the bare runs
show whether the worker's forward pass costs what bare embedding costs. With `--symbols`, the top symbols of each group too (the worker binary runs
from a temporary copy that is deleted: copy `target/release/rag-ingest` to the path
`perf report -v` names first).
"""
import bisect
import collections
import re
import subprocess
import sys


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    if len(args) != 2:
        sys.exit(__doc__)
    log, data = args
    symbols = '--symbols' in sys.argv
    text = open(log, encoding='utf-8').read()
    rounds = [tuple(map(float, r)) for r in re.findall(
        r'end-to-end window ([0-9.]+)–([0-9.]+), bare all-chunks window ([0-9.]+)–([0-9.]+)',
        text)]
    if not rounds:
        sys.exit(f'{log}: no round with windows (run the bench with PIPELINE_ROUNDS=N)')
    fields = 'comm,pid,tid,time' + (',ip,sym,dso' if symbols else '')
    script = subprocess.run(['perf', 'script', '-i', data, '-F', fields],
                            capture_output=True, text=True, check=True).stdout
    samples = []
    for line in script.splitlines():
        m = re.match(r'\s*(.+?)\s+(\d+)/\d+\s+([0-9.]+):\s*(.*)$', line)
        if m:
            comm, pid, time, rest = m.group(1), int(m.group(2)), float(m.group(3)), m.group(4)
            samples.append((time, comm, pid, rest))
    samples.sort(key=lambda s: s[0])
    times = [s[0] for s in samples]
    worker = {pid for _, comm, pid, _ in samples if comm == 'rag-ingest'}
    bench = {pid for _, comm, pid, _ in samples if comm.startswith('pipeline')}
    erlang = re.compile(r'^(\d+_\w+|beam\.smp|erl_child_setup|inet_gethost|epmd)$')

    def group(comm, pid):
        if comm == 'swapper':
            return 'idle'
        if pid in worker:
            if comm == 'rag-ingest':
                return 'worker: model threads'
            if comm.startswith('rag-ingest-emb'):
                return 'worker: embedding thread'
            if comm.startswith('tokio'):
                return 'worker: tokio threads'
            return f'worker: {comm}'
        if pid in bench:
            return 'bench process'
        if erlang.match(comm):
            return 'RabbitMQ'
        return f'other: {comm.split("/")[0]}'

    def window(a, b):
        return samples[bisect.bisect_left(times, a):bisect.bisect_right(times, b)]

    groups, by_symbol = collections.Counter(), collections.defaultdict(collections.Counter)
    total_e2e = total_bare = model_e2e = model_bare = 0
    for i, (a, b, c, d) in enumerate(rounds, 1):
        e2e, bare = window(a, b), window(c, d)
        model = sum(1 for _, comm, pid, _ in e2e
                    if group(comm, pid).startswith(('worker: model', 'worker: embedding')))
        bare_model = sum(1 for _, _, pid, _ in bare if pid in bench)
        total_e2e, total_bare = total_e2e + len(e2e), total_bare + len(bare)
        model_e2e, model_bare = model_e2e + model, model_bare + bare_model
        print(f'round {i}: end to end {len(e2e)} samples, bare {len(bare)}: '
              f'{100 * len(bare) / max(len(e2e), 1):.1f} % on CPU time')
        for _, comm, pid, rest in e2e:
            g = group(comm, pid)
            groups[g] += 1
            if symbols:
                parts = rest.split()
                name = ' '.join(parts[1:]).rsplit(' (', 1)[0] if len(parts) > 1 else '?'
                by_symbol[g][name] += 1
    print(f'all rounds: end to end {total_e2e} samples, bare {total_bare}: '
          f'{100 * total_bare / max(total_e2e, 1):.1f} % on CPU time; model samples '
          f'{model_e2e} in the worker, {model_bare} in the bare runs')
    print('inside the end-to-end windows:')
    for g, n in groups.most_common(12):
        print(f'  {100 * n / max(total_e2e, 1):6.2f} %  {n:8d}  {g}')
    for g, _ in groups.most_common(6) if symbols else []:
        print(f'--- {g}')
        for name, n in by_symbol[g].most_common(20):
            print(f'  {100 * n / groups[g]:6.2f} %  {name}')


if __name__ == '__main__':
    main()
