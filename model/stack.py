"""The norm stack: which norm sits at each site of each block, read from the config.

A config names norms per model (norm, attn_norm, mlp_norm, final_norm), per block (block_norms,
block_positions, block_attention) and per site (site_norms: "block3.attn", "block11.k", "final");
this module expands those into one entry per block, names and parses sites, and checks the whole
stack against the registry (model/norms.py) before anything is built.
"""
from config import UserError
from model.norms import check_norm_name


def expand_per_block(spec, n_layer, key):
    """Expand a per-block spec into one entry per block: a compact string "a*2,b*2" or a TOML list.
    Entries are returned as given (strings, or lists for block_norms' [attn, mlp] pairs)."""
    entries = []
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    for item in items:
        count = 1
        if isinstance(item, str) and "*" in item:
            item, _, times = item.partition("*")
            if not times.strip().isdigit() or int(times) < 1:
                raise UserError(f"{key} entry {item}*{times}: the repeat count must be a positive integer")
            count = int(times)
        entries.extend([item.strip() if isinstance(item, str) else item] * count)
    if len(entries) != n_layer:
        raise UserError(f"{key} describes {len(entries)} blocks but n_layer is {n_layer}; give one entry per block")
    return entries


def parse_block_norms(spec, n_layer):
    """Expand block_norms into one (attn_norm, mlp_norm) pair per block.

    Accepts a compact string "layernorm*2,rmsnorm*2" (a "/" pairs the attention and MLP norms:
    "layernorm/rmsnorm") or a TOML list whose entries are names or [attn, mlp] pairs.
    """
    pairs = []
    for item in expand_per_block(spec, n_layer, "block_norms"):
        if isinstance(item, str):
            parts = [p.strip() for p in item.split("/")]
        elif isinstance(item, list) and all(isinstance(p, str) for p in item):
            parts = item
        else:
            raise UserError(f"block_norms entry {item!r} must be a norm name or an [attn, mlp] pair of names")
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise UserError(f"block_norms entry {item!r} must name one norm or an attn/mlp pair")
        pairs.append(tuple(check_norm_name(p, "block_norms") for p in parts))
    return pairs


POSITIONS = ("pre", "post", "peri", "output")


def resolve_block_positions(config):
    """The norm position of every block: block_positions ("post*2,pre*2") > norm_position."""
    if not config.block_positions:
        return [config.norm_position] * config.n_layer
    positions = expand_per_block(config.block_positions, config.n_layer, "block_positions")
    for p in positions:
        if p not in POSITIONS:
            raise UserError(f"block_positions entry {p!r} is not a position; choose one of {', '.join(POSITIONS)}")
    return positions


ATTENTION = ("local", "global")


def resolve_block_attention(config):
    """Each block's attention, "local" (a sliding window of config.sliding_window tokens) or "global":
    block_attention ("local*5,global") > every block local where sliding_window > 0, else global."""
    if not config.block_attention:
        return ["local" if config.sliding_window else "global"] * config.n_layer
    kinds = expand_per_block(config.block_attention, config.n_layer, "block_attention")
    for kind in kinds:
        if kind not in ATTENTION:
            raise UserError(f"block_attention entry {kind!r} is not valid; choose local or global")
    if "local" in kinds and not config.sliding_window:
        raise UserError("block_attention has local blocks but sliding_window is 0; give the window's length "
                        "in tokens (sliding_window = 512)")
    return kinds


def site_name(block, kind):
    """A norm site's name, the one spelling every report and module uses: (3, "attn") -> "block3.attn";
    (None, "final") -> "final" (sites outside the blocks: "embed", "final")."""
    return kind if block is None else f"block{block}.{kind}"


def parse_site(name):
    """site_name's inverse: "block3.attn" -> (3, "attn"), "final" -> (None, "final")."""
    head, dot, kind = name.partition(".")
    if dot and head.startswith("block") and head[5:].isdigit():
        return int(head[5:]), kind
    return None, name


SITE_KINDS = ("attn", "q", "k", "attn_out", "mlp", "mlp_out")  # a block's norm sites (model/diagnostics.py)


def parse_site_norms(spec):
    """site_norms -> {site name: norm name}: "block3.q=layernorm,final=layernorm", or a TOML list of such entries."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    out = {}
    for item in items:
        site, sep, name = item.partition("=") if isinstance(item, str) else ("", "", "")
        block, kind = parse_site(site.strip())
        if not sep or not (kind in SITE_KINDS if block is not None else kind in ("final", "embed")):
            raise UserError(f"site_norms entry {item!r} must be site=norm with a site named as the diagnostics name it "
                            f"(blockN.{', blockN.'.join(SITE_KINDS)}, final, embed), e.g. 'block3.q=layernorm'")
        if site.strip() in out:
            raise UserError(f"site_norms names {site.strip()!r} twice")
        out[site.strip()] = check_norm_name(name.strip(), "site_norms")
    return out


def site_norm(config, site, default):
    """The norm at one site: its site_norms entry, else `default` (what the other keys put there)."""
    return parse_site_norms(config.site_norms).get(site, default) if config.site_norms else default


def block_norm_names(config, index):
    """{site kind: norm name} of every site of block `index` the keys can set, site_norms applied. An
    output norm defaults to its sublayer's input norm as the other keys set it, not as site_norms does
    (one site changes at a time). The block's position decides which sites exist; q and k are "" without
    qk_norm."""
    attn, mlp = stack_without_site_norms(config)[0][index]

    def at(kind, default):
        return site_norm(config, site_name(index, kind), default)
    qk = config.qk_norm
    return {"attn": at("attn", attn), "mlp": at("mlp", mlp), "attn_out": at("attn_out", config.output_norm or attn),
            "mlp_out": at("mlp_out", config.output_norm or mlp), "q": at("q", qk) if qk else "",
            "k": at("k", qk) if qk else ""}


def stack_without_site_norms(config):
    check_norm_name(config.norm, "norm")
    attn = check_norm_name(config.attn_norm or config.norm, "attn_norm")
    mlp = check_norm_name(config.mlp_norm or config.norm, "mlp_norm")
    final = check_norm_name(config.final_norm or config.norm, "final_norm")
    if config.block_norms:
        return parse_block_norms(config.block_norms, config.n_layer), final
    return [(attn, mlp)] * config.n_layer, final


def resolve_norm_stack(config):
    """The norm at every site: ([(attn_norm, mlp_norm) per block], final_norm).

    Precedence: site_norms (per site) > block_norms (per block) > attn_norm / mlp_norm (every block) > norm
    (default).
    """
    blocks, final = stack_without_site_norms(config)
    blocks = [(site_norm(config, site_name(i, "attn"), a), site_norm(config, site_name(i, "mlp"), m))
              for i, (a, m) in enumerate(blocks)]
    return blocks, site_norm(config, "final", final)


FUSABLE_NORMS = ("rmsnorm", "triton_rmsnorm")  # the norms with add_norm: fused_add_norm's residual add + norm kernel


def norm_names_used(config, blocks, final):
    """Every norm name the stack puts at some site ("" for an absent optional site)."""
    return ({n for pair in blocks for n in pair} | {final, config.qk_norm, config.output_norm, config.embed_norm}
            | set(parse_site_norms(config.site_norms).values()))


def check_site_norms(config, positions):
    """Every site_norms entry names a site this stack has (it changes a norm, it does not add a site)."""
    for site in parse_site_norms(config.site_norms):
        block, kind = parse_site(site)
        missing = None
        if block is not None and block >= config.n_layer:
            missing = f"there are {config.n_layer} blocks (block0..block{config.n_layer - 1})"
        elif kind in ("q", "k") and not config.qk_norm:
            missing = "qk_norm is off"
        elif kind in ("attn_out", "mlp_out") and positions[block] not in ("peri", "output"):
            missing = f"block {block} is a {positions[block]}-norm block (output norms are in peri and output blocks)"
        elif kind in ("attn", "mlp") and positions[block] == "output":
            missing = f"block {block} is an output-norm block (no input norms)"
        elif kind == "embed" and not config.embed_norm:
            missing = "embed_norm is off"
        if missing:
            raise UserError(f"site_norms: this model has no site {site!r}: {missing}")


def check_model_config(config):
    """The checks of a config that need the registry (config.py imports no project module). Call it
    before any data is prepared, so that a bad norm stack fails in the first second."""
    if config.block_type == "normalized":
        return check_normalized(config)
    blocks, final = resolve_norm_stack(config)
    positions = resolve_block_positions(config)
    resolve_block_attention(config)  # not a norm, but per block as positions are: a bad entry fails here too
    if config.qk_norm:
        check_norm_name(config.qk_norm, "qk_norm")
    check_site_norms(config, positions)
    if config.embed_norm:
        check_norm_name(config.embed_norm, "embed_norm")
    used = norm_names_used(config, blocks, final)
    if "seednorm" in used and not config.norm_gain:
        raise UserError("seednorm with norm_gain = false learns nothing and is rmsnorm without a gain; "
                        "use norm_gain = true, or rmsnorm")
    if config.norm_scaling == "layer" and set(positions) - {"pre", "peri"}:
        raise UserError(f"norm_scaling = 'layer' scales the input norms of pre and peri blocks; blocks here are "
                        f"{', '.join(sorted(set(positions) - {'pre', 'peri'}))} (set norm_position or block_positions)")
    if config.output_norm:
        check_norm_name(config.output_norm, "output_norm")
        if not {"peri", "output"} & set(positions):
            raise UserError(f"output_norm = {config.output_norm!r} has no site: no block has norm position "
                            f"'peri' or 'output' (set norm_position or block_positions)")
    if config.fused_add_norm:
        other = sorted({n for pair in blocks for n in pair} - set(FUSABLE_NORMS))
        not_pre = sorted(set(positions) - {"pre"})
        if not_pre or other:
            where = f"norm_position is {config.norm_position!r}" if not config.block_positions else \
                f"block_positions has {', '.join(not_pre)}"
            why = where if not_pre else f"blocks use {', '.join(other)}"
            raise UserError(f"fused_add_norm needs pre-norm blocks whose norms are all rmsnorm or triton_rmsnorm; {why}")
    return config


# keys of the standard block that nGPT has no place for: it has no norm layer and no norm position
NOT_NORMALIZED = ("norm", "attn_norm", "mlp_norm", "final_norm", "block_norms", "site_norms", "norm_position",
                  "block_positions", "output_norm", "qk_norm", "embed_norm", "embed_scale", "norm_scaling",
                  "fused_add_norm", "norm_gain", "dyt_alpha", "dyt_alpha_attn", "derf_alpha", "prms_fraction",
                  "logit_softcap", "bias", "init_from")


def check_normalized(config):
    """block_type = "normalized" (model/normalized.py): refuse every key it would silently ignore."""
    defaults = type(config)()
    changed = [k for k in NOT_NORMALIZED if getattr(config, k) != getattr(defaults, k)]
    if changed:
        raise UserError(f"block_type = 'normalized' (nGPT) has no norm layers, norm positions, biases or soft-cap "
                        f"and starts from no checkpoint; remove {', '.join(f'{k} = {getattr(config, k)!r}' for k in changed)}")
    if config.pos_emb not in ("rope", "none"):
        raise UserError(f"block_type = 'normalized' needs pos_emb = 'rope' or 'none', got {config.pos_emb!r}: "
                        f"a learned position vector added to a unit-norm token embedding leaves the sphere")
    if config.mlp != "swiglu":
        raise UserError(f"block_type = 'normalized' needs mlp = 'swiglu' (the paper's MLP, with its s_u and s_v), "
                        f"got {config.mlp!r}")
    return config


def refuse_normalized(config, what):
    """A one-line refusal of `what` (a tool that needs the standard block's norm sites) for nGPT."""
    if config.block_type == "normalized":
        raise UserError(f"{what} needs the standard block's norm sites; a block_type = 'normalized' (nGPT) "
                        f"model has none (its hidden states are renormalized functionally)")
