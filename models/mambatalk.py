"""MambaTalk generator (spec §4.4): audio + words + speaker + masked motion -> per-part VQ latents and code logits.

Widths come from args (hidden_size H, audio_f A, motion_f M, vae_codebook_size K, pose_dims, pose_length); the
published config (768/512/256/256/330/64) reproduces the released checkpoint's keys and shapes exactly
(`shared/spec/state_dict_mambatalk.tsv`). Attribute names and registration order are that checkpoint format.
"""
import os
import warnings

import torch
import torch.nn as nn

from models import ssm
from models.layers import MLP, Embedding, PeriodicPositionalEncoding, WavEncoder, use_packed_attention
from models.motion_representation import VQEncoderV6

NUM_SPEAKERS = 25  # BEAT2 English speakers after the id remapping of dataloaders (spec §2)
OUTPUT_KEYS = ("rec_face", "rec_upper", "rec_lower", "rec_hands", "cls_face", "cls_upper", "cls_lower", "cls_hands")
BODY_PARTS = ("upper", "hands", "lower")  # the parts generated window by window (the face follows from them)


def transformer_encoder(d_model, nhead, num_layers=1):
    """PyTorch defaults: post-norm, ReLU, dropout 0.1, feed-forward width = d_model."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=d_model, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def motion_dim(args):
    """Motion canvas width: 6D pose + trans (3) + foot contact (4) = 337 published."""
    return args.pose_dims + 3 + 4


class GlobalScan(nn.Module):
    """Masked motion canvas -> global motion tokens (B,T,H);
    face audio/text fusion + motion features -> global features (B,T,H)."""

    def __init__(self, args):
        super().__init__()
        H, A, M, P = args.hidden_size, args.audio_f, args.motion_f, motion_dim(args)
        self.learnable_query = nn.Parameter(torch.zeros(1, 1, P))
        self.motion_encoder = VQEncoderV6(P, M, 3)
        self.motion_proj1 = MLP(M, H, M)
        self.motion_proj2 = nn.Linear(M, H)
        self.position_embeddings = PeriodicPositionalEncoding(H, 0.1, args.pose_length, args.pose_length)
        # face_q_self_attn's output is discarded in the published forward; it is kept only so checkpoints load
        self.face_q_self_attn = transformer_encoder(H, 4)
        self.body_q_self_attn = transformer_encoder(H, 4)
        self.motion_self_encoder = transformer_encoder(H, 4)
        self.face_scan = ssm.MambaScan(A, A, n_layer=1, d_intermediate=2 * A)
        self.body_scan = ssm.MambaScan(M, M, n_layer=1, d_intermediate=H)
        self.out = nn.Linear(A + M, H)

    def forward(self, in_motion, mask, spk_body, face_feat, body_query=None):
        """face_feat = self.face_scan(fusion_face): it does not depend on the motion, so MambaTalk computes it once
        with the rest of the conditioning; so does generation with body_query = body_q_self_attn(spk_body)."""
        query = torch.where(mask == 1, self.learnable_query.expand_as(in_motion), in_motion)
        body_feat = self.motion_encoder(query)
        motion_feat = self.motion_proj2(self.motion_proj1(body_feat))
        if body_query is None:
            body_query = self.body_q_self_attn(spk_body)
        motion_feat = self.position_embeddings(body_query + motion_feat)
        global_motion = self.motion_self_encoder(motion_feat)
        global_features = self.out(torch.cat([face_feat, self.body_scan(body_feat)], dim=-1))
        return global_motion, global_features


class LocalScan(nn.Module):
    """Cross-attends global motion to body audio/text, then per-part Mamba scans -> latents and code logits."""

    def __init__(self, args):
        super().__init__()
        H, A, K = args.hidden_size, args.audio_f, args.vae_codebook_size
        self.position_embeddings = PeriodicPositionalEncoding(H, 0.1, args.pose_length, args.pose_length)
        decoder_layer = nn.TransformerDecoderLayer(H, 4, dim_feedforward=H, batch_first=True)
        self.motion_cross_attn = nn.TransformerDecoder(decoder_layer, num_layers=8)
        self.motion2latent_upper = MLP(H, H, H)
        self.motion2latent_hands = MLP(H, H, H)
        self.motion2latent_lower = MLP(H, H, H)
        self.face_proj = nn.Linear(2 * H, H)
        self.upper_proj = nn.Linear(2 * H, H)
        self.hands_proj = nn.Linear(2 * H, H)
        self.lower_proj = nn.Linear(2 * H, H)
        self.body_proj = nn.Linear(A, H)
        self.face_scan = ssm.MambaScan(H, H, n_layer=4, d_intermediate=H)
        self.upper_scan = ssm.MambaModel(H, n_layer=1, d_intermediate=H)
        self.hands_scan = ssm.MambaModel(H, n_layer=1, d_intermediate=H)
        self.lower_scan = ssm.MambaModel(H, n_layer=1, d_intermediate=H)
        self.motion_down_face = nn.Linear(H, K)
        self.motion_down_upper = nn.Linear(H, K)
        self.motion_down_hands = nn.Linear(H, K)
        self.motion_down_lower = nn.Linear(H, K)
        self.face_classifier = MLP(K, H, K)
        self.upper_classifier = MLP(K, H, K)
        self.hands_classifier = MLP(K, H, K)
        self.lower_classifier = MLP(K, H, K)

    def forward(self, global_motion, global_features, spk_face, spk_body, memory):
        """memory = self.body_proj(fusion_body), computed once with MambaTalk's conditioning."""
        upper, hands, lower = self.body_tokens(global_motion, memory)
        face = self.face_outputs(global_features, spk_face)
        body = self.part_outputs(upper, hands, lower, spk_body)
        return {k: (face | body)[k] for k in OUTPUT_KEYS}

    def body_tokens(self, global_motion, memory):
        """Cross-attends the global motion tokens to the memory; -> upper, hands, lower tokens (B, T, H)."""
        g = global_motion + self.motion_cross_attn(tgt=self.position_embeddings(global_motion), memory=memory)
        return self.motion2latent_upper(g), self.motion2latent_hands(g), self.motion2latent_lower(g)

    def face_outputs(self, global_features, spk_face):
        dec_face = self.face_scan(self.face_proj(torch.cat([self.position_embeddings(spk_face), global_features], -1)))
        rec_face = self.motion_down_face(dec_face)
        return dict(rec_face=rec_face, cls_face=self.face_classifier(rec_face))

    def part_outputs(self, upper, hands, lower, spk_body):
        tokens = dict(upper=upper, hands=hands, lower=lower)
        # the published op order (every part's scan, then the projections down, then the classifiers): the backward
        # pass sums the shared tokens' gradients in the reverse of it, so training gives the same numbers as before
        dec = {part: self.part_scan(part, tokens, spk_body) for part in BODY_PARTS}
        rec = {part: getattr(self, f"motion_down_{part}")(dec[part] + tokens[part]) for part in BODY_PARTS}
        cls = {part: getattr(self, f"{part}_classifier")(rec[part]) for part in ("upper", "lower", "hands")}
        return {f"{kind}_{part}": out[part] for kind, out in (("rec", rec), ("cls", cls))
                for part in ("upper", "lower", "hands")}

    def part_output(self, part, upper, hands, lower, spk_body):
        """part_outputs for one part (generation runs the parts as parallel branches of its CUDA graph)."""
        tokens = dict(upper=upper, hands=hands, lower=lower)
        rec = getattr(self, f"motion_down_{part}")(self.part_scan(part, tokens, spk_body) + tokens[part])
        return {f"rec_{part}": rec, f"cls_{part}": getattr(self, f"{part}_classifier")(rec)}

    def part_scan(self, part, tokens, spk_body):
        """A body part's Mamba scan over its own tokens (with speaker and position) and the sum of the other two
        parts' tokens."""
        first, second = (t for p, t in tokens.items() if p != part)
        x = torch.cat([self.position_embeddings(tokens[part] + spk_body), first + second], dim=-1)
        return getattr(self, f"{part}_scan")(getattr(self, f"{part}_proj")(x))


def word_embedding_weights(args, vocab=None, from_checkpoint=False):
    """(n_words, dim) float tensor for the word embeddings: the vocab's fastText vectors when available
    (`vocab`, else `args.data_path + 'weights/vocab.pkl'`), otherwise a seeded N(0,1) init with a warning.
    from_checkpoint: the caller loads trained weights next, which hold the embeddings: zeros of the right size, no
    warning and no vocab file read."""
    if from_checkpoint:
        return torch.zeros(getattr(vocab, "n_words", None) or args.word_index_num, args.word_dims)
    if vocab is None:
        path = os.path.join(args.data_path, "weights", "vocab.pkl")
        if os.path.isfile(path):
            from dataloaders.beat2 import load_vocab
            vocab = load_vocab(path)
    weights = getattr(vocab, "word_embedding_weights", None)
    if weights is not None:
        return torch.as_tensor(weights, dtype=torch.float32).clone()
    n_words = getattr(vocab, "n_words", None) or args.word_index_num
    source = "the vocabulary has no word_embedding_weights" if vocab is not None else \
        f"no vocab.pkl under {os.path.join(args.data_path, 'weights')}"
    warnings.warn(f"MambaTalk word embeddings: {source}; using a seeded random init ({n_words} x {args.word_dims})")
    generator = torch.Generator().manual_seed(getattr(args, "random_seed", 2021))
    return torch.randn(n_words, args.word_dims, generator=generator)


class MambaTalk(nn.Module):
    """Generator: words and audio fused per channel, speaker embeddings, GlobalScan then LocalScan (spec §4.4.1).

    `vocab` (optional, a dataloaders.beat2.Vocab) provides the word vectors; see word_embedding_weights.
    `from_checkpoint=True` when trained weights are loaded next (test, inference): the vectors then come from them.
    """

    # Several masks in one forward run as one batch of k*B through the motion-dependent part: a third of the kernel
    # launches of the training step's three passes (it is launch-bound on a GPU). Dropout then draws its masks in
    # another order than k separate passes (same distribution); False keeps the passes separate.
    batch_passes = True

    def __init__(self, args, vocab=None, from_checkpoint=False):
        super().__init__()
        if getattr(args, "ssm_backend", None):
            ssm.set_ssm_backend(args.ssm_backend)
        H, A = args.hidden_size, args.audio_f
        self.motion_dim = motion_dim(args)
        words = word_embedding_weights(args, vocab, from_checkpoint)
        freeze = bool(getattr(args, "t_fix_pre", False))
        # face and body branches each get their own (trainable unless t_fix_pre) copy of the word vectors
        self.text_pre_encoder_face = Embedding.from_pretrained(words.clone(), freeze=freeze)
        self.text_encoder_face = nn.Linear(words.shape[1], A)
        self.text_pre_encoder_body = Embedding.from_pretrained(words.clone(), freeze=freeze)
        self.text_encoder_body = nn.Linear(words.shape[1], A)
        self.audio_pre_encoder_face = WavEncoder(A, audio_in=3)
        self.audio_pre_encoder_body = WavEncoder(A, audio_in=2)  # amplitude + CTC id only
        self.at_attn_face = nn.Linear(2 * A, 2 * A)
        self.at_attn_body = nn.Linear(2 * A, 2 * A)
        self.global_scan = GlobalScan(args)
        self.local_scan = LocalScan(args)
        self.speaker_encoder_face = Embedding(NUM_SPEAKERS, H)
        self.speaker_encoder_body = Embedding(NUM_SPEAKERS, H)
        use_packed_attention(self)  # GPU training: fewer kernels per attention (models.layers.PackedAttention)

    @staticmethod
    def fuse(text, audio, gate):
        """Per-channel softmax gate between text and audio; logits (2c, 2c+1) of channel c weigh (audio, text)."""
        alpha = torch.softmax(gate(torch.cat([text, audio], dim=-1)).reshape(*text.shape, 2), dim=-1)
        return text * alpha[..., 1] + audio * alpha[..., 0]

    @staticmethod
    def match_length(feat, n_frames):
        """Crop extra audio frames, or repeat the last frames, so the audio features have n_frames frames."""
        d = n_frames - feat.shape[1]
        if d < 0:
            return feat[:, :n_frames]
        if d > 0:
            if d > feat.shape[1]:
                raise ValueError(f"audio gives {feat.shape[1]} frames, far fewer than the {n_frames} motion frames")
            return torch.cat([feat, feat[:, -d:]], dim=1)
        return feat

    def encode_condition(self, in_audio, in_word, in_id, n_frames, passes=1):
        """Everything that does not depend on the motion canvas or its mask: audio and text encoders, their fusion,
        speaker embeddings, the face branch's first Mamba scan and the cross-attention memory. No dropout acts here,
        so several passes over the same batch can share one conditioning exactly.

        In training mode the audio encoders' BatchNorm layers update their running statistics once; `passes` > 1
        makes that update equal to `passes` identical updates (what separate forward passes would do).
        """
        saved = self._bn_stats() if self.training and passes > 1 else None
        text_face = self.text_encoder_face(self.text_pre_encoder_face(in_word))
        text_body = self.text_encoder_body(self.text_pre_encoder_body(in_word))
        audio_face = self.match_length(self.audio_pre_encoder_face(in_audio), n_frames)
        audio_body = self.match_length(self.audio_pre_encoder_body(in_audio[..., :2]), n_frames)
        if saved is not None:
            self._repeat_bn_update(saved, passes)
        fusion_face = self.fuse(text_face, audio_face, self.at_attn_face)
        fusion_body = self.fuse(text_body, audio_body, self.at_attn_body)
        return dict(spk_face=self.speaker_encoder_face(in_id).squeeze(2),
                    spk_body=self.speaker_encoder_body(in_id).squeeze(2),
                    face_feat=self.global_scan.face_scan(fusion_face),
                    memory=self.local_scan.body_proj(fusion_body))

    def predict(self, condition, mask, in_motion):
        """The motion-dependent part of the forward pass, from encode_condition's output."""
        if in_motion.shape[-1] != self.motion_dim or mask.shape != in_motion.shape:
            raise ValueError(f"MambaTalk expects in_motion and mask of shape (B, T, {self.motion_dim}), "
                             f"got {tuple(in_motion.shape)} and {tuple(mask.shape)}")
        c = condition
        global_motion, global_features = self.global_scan(in_motion, mask, c["spk_body"], c["face_feat"])
        return self.local_scan(global_motion, global_features, c["spk_face"], c["spk_body"], c["memory"])

    def generation_condition(self, condition):
        """encode_condition's output plus what generation can also compute once for every window (eval mode: no
        dropout): GlobalScan's speaker query tokens (a transformer layer). The cross-attention keys and values of
        the memory could be too, but would hold 16x the memory's size for every window of a long recording."""
        return dict(condition, body_query=self.global_scan.body_q_self_attn(condition["spk_body"]))

    def body_tokens(self, condition, mask, in_motion):
        """Generation's window step up to the body parts, from generation_condition's output: the upper, hands and
        lower tokens (LocalScan.part_output's inputs) and the 'global_features' that predict_face needs (the face
        codes do not feed the next window's seed, so generation runs the face branch for all windows at once)."""
        c = condition
        global_motion, global_features = self.global_scan(in_motion, mask, c["spk_body"], c["face_feat"],
                                                          c["body_query"])
        return self.local_scan.body_tokens(global_motion, c["memory"]), global_features

    def predict_face(self, spk_face, global_features):
        return self.local_scan.face_outputs(global_features, spk_face)

    def _audio_batchnorms(self):
        encoders = (self.audio_pre_encoder_face, self.audio_pre_encoder_body)
        return [m for e in encoders for m in e.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum]

    @torch.no_grad()
    def _bn_stats(self):
        stats = [t for m in self._audio_batchnorms() for t in (m.running_mean, m.running_var)]
        saved = [torch.empty_like(t) for t in stats]
        torch._foreach_copy_(saved, stats)  # one multi-tensor copy instead of a clone per tensor (launch-bound GPUs)
        return saved

    @torch.no_grad()
    def _repeat_bn_update(self, saved, passes):
        """After one update r1 = (1-m) r0 + m x, set r = (1-m)^k r0 + (1-(1-m)^k) x: k updates with the same x.
        Multi-tensor ops per momentum value (the same arithmetic as per-tensor ops; ~300 fewer GPU launches)."""
        bns = self._audio_batchnorms()
        groups = {}
        for m, r0_mean, r0_var in zip(bns, saved[0::2], saved[1::2]):
            # .data: batch_norm saved these for backward (unused in training)
            runs, r0s = groups.setdefault(m.momentum, ([], []))
            runs += [m.running_mean.data, m.running_var.data]
            r0s += [r0_mean, r0_var]
        for momentum, (runs, r0s) in groups.items():
            keep = 1.0 - momentum
            c1 = (1.0 - keep ** passes) / momentum  # weight of r1; r0 gets keep^k - c1 * keep
            c0 = keep ** passes - c1 * keep
            torch._foreach_mul_(runs, c1)
            torch._foreach_add_(runs, r0s, alpha=c0)
        torch._foreach_add_([m.num_batches_tracked for m in bns], passes - 1)

    def forward(self, in_audio, in_word, mask, in_motion, in_id, condition=None, stack_passes=False, **kwargs):
        """in_audio (B,L,3), in_word (B,T) long, mask and in_motion (B,T,pose_dims+7), in_id (B,T,1) long.
        Returns rec_{face,upper,lower,hands} (B,T,K) latents and cls_* (B,T,K) code logits.

        `mask` may be a list of masks: then the passes share one conditioning (encode_condition, with the BatchNorm
        statistics updated as by that many separate passes), run as one batch (see batch_passes) and a list of
        output dicts comes back, one per mask (`stack_passes`: one dict whose batch holds the passes one after the
        other, (k*B, T, K), for losses computed for all passes at once).
        This is the training step's three passes in one call. `condition` (from encode_condition) skips the
        encoders. Extra keyword arguments of the published call (use_word, is_test, ...) have no effect there and
        are ignored."""
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
        if condition is None:
            condition = self.encode_condition(in_audio, in_word, in_id, in_motion.shape[1], passes=len(masks))
        if len(masks) > 1 and self.batch_passes:
            k = len(masks)
            # the cross-attention memory is not repeated: its keys and values are computed once for the k passes
            # (layers.PackedAttention), a third of the projections' work
            stacked = {name: v if name == "memory" else v.repeat(k, *[1] * (v.dim() - 1))
                       for name, v in condition.items()}
            out = self.predict(stacked, torch.cat(masks), in_motion.repeat(k, 1, 1))
            if stack_passes:
                return out
            outputs = [dict(zip(out, parts)) for parts in zip(*(v.chunk(k) for v in out.values()))]
        else:
            outputs = [self.predict(condition, m, in_motion) for m in masks]
        if stack_passes:
            return {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}
        return outputs if isinstance(mask, (list, tuple)) else outputs[0]
