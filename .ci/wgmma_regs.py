#!/usr/bin/env python3
"""Checks sm_90a SASS (`cuobjdump -sass` text) for wgmma input registers that ptxas reused or touched too early.

ptxas before CUDA 13.3 can reuse or overwrite the registers of a register-A wgmma (HGMMA with A in registers) while
the asynchronous wgmma may still read them: triton-lang/triton PR #11781 ("Use fixed ptxas for Hopper register-input
WGMMA"), issue #9433 ("RAW hazard with pipelined wgmma and LHS in register", fixed in ptxas 13.3); ours is 13.0.
At dccd387 the dK/dV kernel at headdim 64 loaded K / V fragments by LDSM once, before its loop, into R152-R183;
ptxas reused them in the loop for the packed P^T / dS^T (F2FP), and after the back edge the S^T wgmma read R152:
wrong dK / dV on the GPU while the CPU emulator passed. For each kernel with HGMMA instructions:
rule 1: the definitions that can reach a register-A HGMMA's 4 A registers over the control-flow graph (branches,
  loops, EXIT, CALL / RET; a predicated definition kills none) share one opcode: a mix such as LDSM and F2FP means
  ptxas reused a register the source keeps for the wgmma. A register undefined on some path is not flagged (the
  forward kernel's pipelined P.V wgmma has such paths, infeasible ones).
rule 2: from an HGMMA's issue to the WARPGROUP.DEPBAR retiring its group (groups close at an HGMMA with gsb0;
  DEPBAR.LE gsb0, N keeps the N newest) no other instruction writes its A registers or touches its accumulators,
  and no HGMMA uses registers an ordinary instruction wrote since the last WARPGROUP.ARRIVE. Per instruction the
  worklist keeps a written-since-ARRIVE set per (committed groups, open group), joined by union (exact); past
  MAX_GROUPS committed groups the two oldest merge (exact for DEPBAR N < MAX_GROUPS).
Widths: .64 / .WIDE / CS2R pairs, .128 quads, LDSM / STSM .2 / .4, a 64xN HGMMA's N/2 accumulators (N/4 if F16),
64-bit conversions and D* results; other multi-register results (HMMA, texture) count as one register.
Usage: wgmma_regs.py FILE.sass [...] (exit 1 on a violation, 2 on input without HGMMA kernels) | --self-test.
"""
import re
import sys

MAX_GROUPS = 8
FUNCTION = re.compile(r'\s*Function : (\S+)')
INSTRUCTION = re.compile(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;')
REGISTER = re.compile(r'\bR(\d+)(\.64)?')
PLAIN_REGISTER = re.compile(r'-?\|?R(\d+)\|?(\.\w+)*')
PREDICATE = re.compile(r'!?U?P[0-6T]')
MANGLED = re.compile(r'(\d+)|L[a-z]n?(\d+)E|(I)')
NO_GROUP = (frozenset(), frozenset())


class Inst:
    """One instruction: address, text, guard, opcode, operands; registers written and read; an HGMMA's A and C."""

    def __init__(self, addr, text):
        self.addr, self.text = addr, text
        guard = re.match(r'@\S+\s+', text)
        self.guarded = guard is not None
        self.op, _, rest = text[guard.end() if guard else 0:].partition(' ')
        self.base = self.op.split('.')[0]
        self.operands = [o.strip() for o in rest.split(',')] if rest.strip() else []
        self.a_regs = self.acc = frozenset()
        if self.base == 'HGMMA':
            shape = re.match(r'HGMMA\.64x(\d+)x\d+\.(\w+)', self.op)
            if not shape or len(self.operands) < 3:
                raise ValueError(f'unparsable HGMMA at {addr:#x}: {text}')
            self.acc = registers(self.operands[0], int(shape.group(1)) // (4 if shape.group(2) == 'F16' else 2))
            self.a_regs = registers(self.operands[1], 4)
            self.writes, self.reads = self.acc, frozenset()
        else:
            self.writes, self.reads = ordinary_registers(self)


def registers(operand, count):
    """The `count` registers from a plain register operand on (none for RZ, descriptors, memory operands)."""
    match = PLAIN_REGISTER.fullmatch(operand)
    return frozenset(range(int(match.group(1)), int(match.group(1)) + count)) if match else frozenset()


def width(op):
    """Registers written (or stored) through one register operand of a non-HGMMA opcode."""
    parts = op.split('.')
    if parts[0] in ('LDSM', 'STSM'):  # LDSM.16.M88.4: x4
        return {'2': 2, '4': 4}.get(parts[-1], 1)
    if '128' in parts:
        return 4
    kinds = 'F' if parts[0] in ('I2F', 'F2F') else 'US' if parts[0] in ('F2I', 'I2I') else ''
    types = [p for p in parts[1:] if re.fullmatch(r'[FUS]\d+', p) and p[0] in kinds]  # the result's type comes first
    pair = '64' in parts or 'WIDE' in parts or parts[0] in ('DADD', 'DMUL', 'DFMA') or op == 'CS2R'  # not CS2R.32
    return 2 if pair or types[:1] in (['F64'], ['U64'], ['S64']) else 1


def ordinary_registers(inst):
    """(written, read) registers of a non-HGMMA instruction."""
    operands = inst.operands
    if inst.base in ('SHFL', 'LOP3') and operands and PREDICATE.fullmatch(operands[0]):
        operands = operands[1:]  # SHFL.BFLY PT, R235, ... and LOP3.LUT P3, R0, ...: the register result comes second
    first = operands[0] if operands else ''
    writes = registers(first, width(inst.op)) if inst.base not in ('WARPSYNC', 'BAR') else frozenset()
    stored = width(inst.op) if '[' in first else 1  # a store's data operands span its width
    reads = set()
    for operand in operands[1:] if writes else operands:
        reads |= registers(operand, stored)
        for number, pair in REGISTER.findall(operand):
            reads.update(range(int(number), int(number) + (2 if pair else 1)))
    return writes, frozenset(reads)


def short_name(mangled):
    """_ZN...24swa_bwd_dkdv_sm90_kernelI6__halfLi64EE... -> swa_bwd_dkdv_sm90_kernel<__half,64>, roughly."""
    tokens, pos = [], 3
    while mangled.startswith('_ZN') and (match := MANGLED.match(mangled, pos)):
        size = int(match.group(1) or 0)
        tokens.append(mangled[match.end():match.end() + size] if size else match.group(2) or 'I')
        pos = match.end() + size
    if 'I' not in tokens:
        return tokens[-1] if tokens else mangled
    return f'{tokens[tokens.index("I") - 1]}<{",".join(tokens[tokens.index("I") + 1:])}>'


def parse(text):
    """[(kernel name, [Inst])] of cuobjdump -sass text."""
    kernels = []
    for line in text.splitlines():
        if match := FUNCTION.match(line):
            kernels.append((match.group(1), []))
        elif (match := INSTRUCTION.match(line)) and kernels:
            kernels[-1][1].append(Inst(int(match.group(1), 16), match.group(2)))
    return kernels


def successors(insts):
    """Control-flow successors (indices) of each instruction; a RET returns after every CALL."""
    index = {inst.addr: i for i, inst in enumerate(insts)}
    returns = [i + 1 for i, inst in enumerate(insts) if inst.base == 'CALL']
    result = []
    for i, inst in enumerate(insts):
        after = [i + 1] if i + 1 < len(insts) else []
        last = inst.operands[-1] if inst.operands else ''
        target = index.get(int(last, 16)) if inst.base in ('BRA', 'CALL', 'WARPSYNC') and last[:2] == '0x' else None
        if inst.base in ('BRX', 'JMX', 'JMP') or inst.base in ('BRA', 'CALL') and target is None:
            raise ValueError(f'{inst.addr:#x} {inst.text}: indirect, or its target is no instruction')
        if inst.base in ('EXIT', 'RET', 'KILL'):
            result.append((returns if inst.base == 'RET' else []) + (after if inst.guarded else []))
        elif inst.base == 'BRA':  # conditional when guarded or given a condition: @P0 BRA, BRA !P2, BRA.DIV UR7
            result.append([target] + (after if inst.guarded or len(inst.operands) > 1 else []))
        else:
            result.append([target] if inst.base == 'CALL' else after + ([] if target is None else [target]))
    return result


def reg_list(regs):
    """'R8 R9 R10 ...': the first 8 registers of a set."""
    return ' '.join(f'R{r}' for r in sorted(regs)[:8]) + (' ...' if len(regs) > 8 else '')


def rule_one(insts, succ):
    """Rule 1: {(index, message)} for register-A HGMMAs whose A registers definitions of two opcodes reach."""
    tracked = frozenset().union(*(inst.a_regs for inst in insts))
    reach = [None] * len(insts)  # per instruction: register -> indices of the definitions reaching it
    reach[0], work = {}, [0]
    while work:
        i = work.pop()
        out = dict(reach[i])
        for r in insts[i].writes & tracked:
            out[r] = out.get(r, frozenset()) | {i} if insts[i].guarded else frozenset({i})
        for j in succ[i]:
            joined = dict(reach[j] or {})
            for r, defs in out.items():
                joined[r] = joined.get(r, frozenset()) | defs
            if reach[j] is None or joined != reach[j]:
                reach[j] = joined
                work.append(j)
    found = set()
    for i, inst in enumerate(insts):
        by_op = {}
        for d in sorted(frozenset().union(*((reach[i] or {}).get(r, frozenset()) for r in inst.a_regs))):
            by_op.setdefault(insts[d].base, []).append(f'{insts[d].addr:#x}')
        if len(by_op) > 1:
            defs = '; '.join(f'{op} at {" ".join(addrs)}' for op, addrs in sorted(by_op.items()))
            found.add((i, f'rule 1: A registers {reg_list(inst.a_regs)} defined by {defs}'))
    return found


def step(inst, groups, written):
    """Rule 2 over `inst`: the next (committed groups, open group), a group being (A registers, accumulators), the
    next registers written since the last ARRIVE, and [(problem, registers)], empty sets where there is none."""
    committed, open_group = groups
    a_in_flight = frozenset().union(*(g[0] for g in committed + (open_group,)))
    acc_in_flight = frozenset().union(*(g[1] for g in committed + (open_group,)))
    if inst.base != 'HGMMA':
        if inst.op.startswith('WARPGROUP.ARRIVE') and not inst.guarded:
            return groups, frozenset(), []
        if inst.op.startswith('WARPGROUP.DEPBAR') and not inst.guarded:
            keep = int(inst.operands[-1], 16)
            return (committed[-keep:] if keep else (), open_group), written, []
        touched = (inst.writes | inst.reads) & acc_in_flight
        return groups, written | inst.writes, [('writes A registers of an in-flight HGMMA', inst.writes & a_in_flight),
                                               ('touches accumulators of an in-flight HGMMA', touched)]
    problems = [('reads in-flight accumulators as A', inst.a_regs & acc_in_flight),
                ('writes A registers of an in-flight HGMMA', inst.acc & a_in_flight),
                ('uses registers written since the last WARPGROUP.ARRIVE', (inst.a_regs | inst.acc) & written)]
    open_group = (open_group[0] | inst.a_regs, open_group[1] | inst.acc)
    if 'gsb0' in inst.operands:
        committed, open_group = committed + (open_group,), NO_GROUP
        if len(committed) > MAX_GROUPS:
            committed = ((committed[0][0] | committed[1][0], committed[0][1] | committed[1][1]),) + committed[2:]
    return (committed, open_group), written, problems


def rule_two(insts, succ):
    """Rule 2: {(index, message)}, from a worklist over per-instruction states."""
    states = [{} for _ in insts]  # per instruction: (committed groups, open group) -> registers written since ARRIVE
    states[0][((), NO_GROUP)] = frozenset()
    work, hits = [(0, ((), NO_GROUP))], {}
    while work:
        i, groups = work.pop()
        after, written, problems = step(insts[i], groups, states[i][groups])
        for what, regs in problems:
            if regs:
                hits[i, what] = hits.get((i, what), frozenset()) | regs
        for j in succ[i]:
            old = states[j].get(after, frozenset())
            if after not in states[j] or not written <= old:
                states[j][after] = written | old
                work.append((j, after))
    return {(i, f'rule 2: {what}: {reg_list(regs)}') for (i, what), regs in hits.items()}


def violations(insts):
    """Sorted (index, message) of both rules for one kernel's instructions."""
    succ = successors(insts)
    return sorted(rule_one(insts, succ) | rule_two(insts, succ))


def check(text, label):
    """Prints a line per violation and per HGMMA kernel of SASS `text`; the number of violations."""
    kernels = [(short_name(name), insts) for name, insts in parse(text) if any(x.base == 'HGMMA' for x in insts)]
    if not kernels:
        raise ValueError('no kernel with HGMMA instructions (not cuobjdump -sass of sm_90a code?)')
    total = 0
    for name, insts in kernels:
        try:
            found = violations(insts)
        except ValueError as error:
            raise ValueError(f'{name}: {error}') from None
        for i, message in found:
            print(f'wgmma_regs: {label}: {name}: {insts[i].addr:#06x} {insts[i].text}: {message}')
        hgmma = [inst for inst in insts if inst.base == 'HGMMA']
        counts = f'{len(hgmma)} HGMMA, {sum(1 for inst in hgmma if inst.a_regs)} with A in registers'
        print(f'wgmma_regs: {label}: {name}: {f"{len(found)} violation(s)" if found else "ok"} ({counts})')
        total += len(found)
    return total


LOOP = ('LDSM.16.M88.4 R4, [R2]; WARPGROUP.ARRIVE; HGMMA.64x16x16.F32 R8, R4, gdesc[UR4], RZ, !UPT, gsb0; '
        'WARPGROUP.DEPBAR.LE gsb0, 0x0; F2FP.F16.F32.PACK_AB {p}, R9, R8; WARPGROUP.ARRIVE; '
        'HGMMA.64x16x16.F32 R24, {p}, gdesc[UR8], R24, gsb0; WARPGROUP.DEPBAR.LE gsb0, 0x0; @P0 BRA 0x10; '
        'STG.E.128 desc[UR6][R2.64], R24; EXIT')
ONE_GROUP = ('{load}; {fence}; HGMMA.64x16x16.F32 R8, R4, gdesc[UR4], RZ, !UPT, gsb0; {between}; '
             'WARPGROUP.DEPBAR.LE gsb0, 0x0; EXIT')
LDSM, F2FP, FENCE = 'LDSM.16.M88.4 R4, [R2]', 'F2FP.F16.F32.PACK_AB R7, R1, R0; ', 'WARPGROUP.ARRIVE'
SELF_TESTS = [  # (what, the rules it breaks, its instructions at 0x0, 0x10, ...)
    ('clean loop', set(), LOOP.format(p='R20')),
    ('A register reached by LDSM and, over the back edge, F2FP', {1}, LOOP.format(p='R4')),
    ('F2FP of R7, then LDSM.x4 of R4-R7', set(), ONE_GROUP.format(load=F2FP + LDSM, fence=FENCE, between='NOP')),
    ('F2FP of R7, then a predicated LDSM', {1}, ONE_GROUP.format(load=F2FP + '@!P0 ' + LDSM, fence=FENCE,
                                                                 between='NOP')),
    ('write to an in-flight A register', {2}, ONE_GROUP.format(load=LDSM, fence=FENCE, between='MOV R7, RZ')),
    ('accumulator read before its DEPBAR', {2}, ONE_GROUP.format(load=LDSM, fence=FENCE, between='FADD R0, R15, R1')),
    ('no WARPGROUP.ARRIVE after the LDSM', {2}, ONE_GROUP.format(load=LDSM, fence='NOP', between='NOP')),
]


def self_test():
    """Runs both rules on SELF_TESTS: 0 when each breaks exactly its rules."""
    failed = 0
    for what, expected, body in SELF_TESTS:
        lines = [f'/*{16 * i:04x}*/ {text.strip()} ;' for i, text in enumerate(body.split(';'))]
        rules = {int(message[5]) for _, message in violations(parse('Function : test\n' + '\n'.join(lines))[0][1])}
        print(f'wgmma_regs: self-test: {what}: rules {sorted(rules)}, expected {sorted(expected)}')
        failed += rules != expected
    return 1 if failed else 0


def main(args):
    """Checks the files of `args`, or runs the self-test; the exit status."""
    if args == ['--self-test']:
        return self_test()
    if not args or any(arg.startswith('-') for arg in args):
        print('usage: wgmma_regs.py FILE.sass [FILE.sass ...] | --self-test', file=sys.stderr)
        return 2
    total = 0
    for path in args:
        try:
            total += check(open(path).read(), path)
        except (OSError, ValueError) as error:
            print(f'wgmma_regs: {path}: {error}', file=sys.stderr)
            return 2
    return 1 if total else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
