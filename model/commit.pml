/*
 * Tessera's commit and restore protocol (docs/PROTOCOL.md) in Promela.  Run model/check.sh.
 *
 * WHAT IS MODELLED
 *   3 daemons (nodes 0,1,2), one job of 2 ranks.  The trainer of rank r registered with node r
 *   (its owner, 2 slots).  A shard's k+m = 2 fragments go to the two other nodes (k = 1, m = 1): a
 *   shard is restorable iff its owner holds it sealed or 1 of its 2 fragments is on a node that
 *   is not lost.  Node 2 holds fragments only.  The coordinator is a function of the live set: the
 *   first daemon that is up in the rendezvous order 0,1,2 (node 0 is an owner and the coordinator).
 *
 *   A shard version is (rank, step, epoch, content).  The content id (the CRC) is the trainer run
 *   that computed it: two runs restarted from one commit compute different bytes for the same step,
 *   so two histories in one commit show up as two content ids.
 *
 *   Messages are delivered at once unless a budgeted fault hits them: a message may be lost, or
 *   delayed (it stays in flight and arrives later, after anything else: reordering), or
 *   duplicated (it stays in flight after it was delivered).  Reports in flight are a set;
 *   JobStates in flight are one per (destination, sender), a later one superseding an earlier one
 *   of the same sender.  Periodic re-sends (reports, ResolveRestore) are modelled as "send again
 *   after a message was lost or the coordinator changed".
 *
 *   Faults, each with a budget (-D knobs below): daemon crash and restart (the restarted daemon
 *   keeps sealed slots and fragments and loses its soft state: commit record, coordinator state,
 *   protection queue, and every epoch it knew except what its slot headers carry), node loss
 *   (memory gone, at most m), message loss / delay / duplication, coordinator change (a crash,
 *   restart or loss that moves the first live daemon), a job restart (every trainer is restarted
 *   and resumes: ResolveRestore with resume), and zombies: messages of an incarnation that has
 *   since restarted (still in flight) are fenced by their receiver.
 *
 * PROPERTIES ("VIOLATION <name>" is printed before assert(false); check.sh runs each)
 *   committed_restorable  in every state, while at most m nodes are lost, every rank of the newest
 *                         commit a live daemon knows is restorable with exactly the committed
 *                         content (monitor process inv1)
 *   never_behind          a restore answer is never older than a commit a live daemon knows
 *   no_mix                a commit, and a restore point, name shards of one history (one content
 *                         id) and one epoch
 *   consistent_restart    the ranks of one job restart are answered the same restore point
 *   restorable            a restore answer is never DATA_LOSS and PrepareRestore finds the shard
 *   live (LTL, with -DLIVENESS): once faults stop, every step that all ranks sealed in the current
 *                         epoch is committed (or superseded by a newer commit of that epoch) and
 *                         no trainer waits forever
 *   fencing               every receiver refuses a message of an older incarnation (-DBUG_NO_FENCE
 *                         accepts them)
 *   drop_final            after a drop a majority took, no restore answer names a commit of the
 *                         drop's epoch or older (-DMAXDROP=1: the operator stops the trainers and
 *                         drops the job at its coordinator; a job restart after it is the
 *                         relaunch; daemons that were down during it come back with their
 *                         slots, fragments and commit).  With a drop, never_behind and
 *                         committed_restorable count only commits the drop did not void.
 *
 * The broken variants (-DBUG_*) and the protocol without one of its rules
 * (-DPROTOCOL_AS_WRITTEN_*) are described in model/check.sh, with the property each breaks; the
 * rules themselves (FIX_*) below, and in docs/PROTOCOL.md.
 */

#ifndef HIDDEN
#define HIDDEN hidden
#endif

#define NN 3            /* nodes 0,1,2 */
#define NR 2            /* ranks 0,1 */
#ifndef NS
#define NS 3            /* steps 1..NS */
#endif
#define NV 7            /* shard versions 1..NV-1 per rank (0 = none) */
#define NC 12           /* commit records 1..NC-1 (0 = none) */
#define M 1             /* m, with k = 1 */
#define NOCOORD 3

#define SEALED 1
#define PROT 2
#define RESUMING 0
#define RUN 1
#define TDEAD 2
#define TSTOP 3         /* stopped by the operator before a drop; a job restart relaunches it */
#define PNONE 0         /* previous step sealed by the rank in this epoch: -1, none */

/* fault budgets */
#ifndef MAXCRASH
#define MAXCRASH 1
#endif
#ifndef MAXRUN
#define MAXRUN 1        /* job restarts */
#endif
#ifndef MAXLOSS
#define MAXLOSS 0       /* node losses */
#endif
#ifndef MAXMSGF
#define MAXMSGF 1       /* message losses, delays and duplications */
#endif
#ifndef CRASHMASK
#define CRASHMASK 7     /* daemons that may crash (bit n) */
#endif
#ifndef LOSSMASK
#define LOSSMASK 7      /* nodes that may be lost */
#endif
#ifndef MAXDROP
#define MAXDROP 0       /* drops of the job (tessera drop) */
#endif
#ifndef MSGKINDS
#define MSGKINDS 7      /* messages that faults may hit: 1 reports, 2 JobStates, 4 restore requests and answers */
#endif
#define MSGFAULTS (nmsgf < MAXMSGF && !stopped)
#define MF(kind) (MSGFAULTS && (MSGKINDS & (kind)))
/* For safety a delayed message may stay in flight forever, which subsumes its loss; loss (after
   which the sender re-sends) is only added for liveness (-DMSGLOSS). */
#ifdef MSGLOSS
#define LOSSF MSGFAULTS
#else
#define LOSSF 0
#endif

#ifdef POLICY_WAIT
#define POLWAIT 1
#else
#define POLWAIT 0
#endif

/* ---------------- the rules the model found necessary ----------------
 * Each is on unless -DPROTOCOL_AS_WRITTEN_<X> turns it off (the protocol as first written); the
 * check.sh case of that name shows the property that breaks without it.
 *   FIX_DURABLE_STATE (off: _SOFT_STATE)  a daemon stores the epoch and the commit record it learned
 *       next to its slots: both survive its restart (as written, only the epochs its slot headers
 *       carry did).  Without it, and without the other rules, case as_written breaks no_mix; with
 *       the other rules, no budget of check.sh breaks anything without it (with one crash the
 *       other daemons still know the epoch, and FIX_COORD_VIEW learns it from them): it is kept
 *       for a restart of every daemon that knew the epoch, which those budgets do not reach.
 *   FIX_EPOCH_RULE (off: _EPOCH_RULE)  a resume starts a new epoch iff the current one may hold a
 *       shard (a live daemon holds a slot or fragment of it, or a daemon that will come back did
 *       not answer), unless it retries a resume of the same trainer run already answered in this
 *       epoch (as written: iff the rank already resumed in the epoch, or the coordinator has no
 *       record of who resumed).
 *   FIX_COORD_VIEW (off: _LATE_COMMIT)  a daemon that becomes coordinator learns the job's epoch
 *       and commit from a complete view before it acts on a report (modelled at the takeover);
 *       ListHeld answers carry each daemon's epoch, and the coordinator adopts a newer one; before
 *       a restore is answered, every live daemon of the job has learned its epoch and commit.
 *   FIX_DEAD_FIRST (off: _DEAD_FIRST)  the steps below a rank's first step in an epoch (previous
 *       step -1) are dead too, not only those between two of its steps.
 *   FIX_STUCK (off: _STUCK_OWNER)  a restarted owner asks the coordinator for the job's state at
 *       once, not waiting for a report of its own to be answered (it may have none to send); and
 *       (FIX_REFUSAL, TEACHES) a holder that refuses a fragment of an older epoch answers with the
 *       epoch it knows, which the owner adopts.
 */
#ifdef PROTOCOL_AS_WRITTEN
#define PROTOCOL_AS_WRITTEN_SOFT_STATE
#define PROTOCOL_AS_WRITTEN_EPOCH_RULE
#define PROTOCOL_AS_WRITTEN_LATE_COMMIT
#define PROTOCOL_AS_WRITTEN_DEAD_FIRST
#define PROTOCOL_AS_WRITTEN_STUCK_OWNER
#endif
#ifdef PROTOCOL_AS_WRITTEN_SOFT_STATE
#define FIX_DURABLE_STATE 0
#else
#define FIX_DURABLE_STATE 1
#endif
#ifdef PROTOCOL_AS_WRITTEN_EPOCH_RULE
#define FIX_EPOCH_RULE 0
#else
#define FIX_EPOCH_RULE 1
#endif
#ifdef PROTOCOL_AS_WRITTEN_LATE_COMMIT
#define FIX_COORD_VIEW 0
#else
#define FIX_COORD_VIEW 1
#endif
#ifdef PROTOCOL_AS_WRITTEN_DEAD_FIRST
#define FIX_DEAD_FIRST 0
#else
#define FIX_DEAD_FIRST 1
#endif
#ifdef PROTOCOL_AS_WRITTEN_STUCK_OWNER
#define FIX_STUCK 0
#else
#define FIX_STUCK 1
#endif

#define VI(r,x) ((r)*NV+(x))
#define SI(r,i) ((r)*2+(i))
#define FI(n,r) ((n)*NR+(r))
#define JI(n,c) ((n)*NN+(c))   /* JobState in flight to n from c */
#define H1(r) (1-(r))          /* rank r's fragment holders: the other owner and node 2 */
#define H2(r) 2

/* ---------------- state ---------------- */
/* shard versions: step, epoch, content id, previous step sealed by the rank in that epoch */
byte vs[NR*NV]; byte ve[NR*NV]; byte vc[NR*NV]; byte vp[NR*NV];
byte nv[NR];
/* commit records ever made (a ghost table; a daemon's record is an index into it) */
byte cme[NC]; byte cms[NC]; byte cmv[NC*NR]; byte ncm;
/* daemons */
bool up[NN]; bool lost[NN]; byte inc[NN];
byte ep[NN];            /* epoch known for J */
byte cr[NN];            /* commit record known */
bool fresh[NN];         /* restarted, no JobState since: every sealed slot is kept */
byte dead[NN];          /* dead steps (bit s) of epoch ep[n] */
byte dr[NN];            /* the epoch the job was dropped at, as n knows it (0: none); soft state */
/* coordinator soft state */
byte crep[NN*NR];       /* per rank: versions reported protected in epoch ep[c] */
bool chas[NN];          /* has a record of the job's restorers for ep[c] */
byte crest[NN];         /* ranks that resumed in ep[c] */
byte crun[NN*NR];       /* FIX_EPOCH_RULE: trainer run (+1) of the rank's last resume answered in ep[c] */
byte preq[NN];          /* ResolveRestore being answered: rank+1, 0 none */
byte pmask[NN];         /* daemons that answered ListHeld */
byte prun[NN];          /* the trainer run of that request */
/* owner slots: 2 per rank, on node r */
byte slv[NR*2]; byte sst[NR*2]; bool spk[NR*2]; bool rsent[NR*2];
bool jqsent[NR];        /* FIX_STUCK: a restarted owner asked the coordinator for the JobState */
/* fragments: fr[n*NR+r] = versions of rank r held by node n */
byte fr[NN*NR];
/* trainers */
byte ts[NR]; byte tstep[NR]; byte lin[NR]; bool rqsent[NR];
/* in flight */
short rset[NR];         /* ReportProtected: bit 2*version + prev known */
short rstale[NR];       /* ... sent by an incarnation that has since restarted (BUG_NO_FENCE only) */
bool jv[NN*NN]; byte jep[NN*NN]; byte jci[NN*NN]; byte jdd[NN*NN]; byte jsi[NN*NN]; byte jdr[NN*NN];
bool rq[NR]; byte rqc[NR]; byte rqi[NR]; byte rqn[NR];
bool ra[NR]; byte rae[NR]; byte rap[NR]; byte ras[NR]; byte rar[NR];
/* faults */
byte ncrash; byte nrun; byte nloss; byte nmsgf; bool stopped; byte ndrop;
/* ghost */
byte gE;                /* newest epoch ever started */
bool runset; byte runrp;/* restore point of the current job restart */
byte gsl[4];            /* ranks that sealed step s in epoch gE */
byte gcm;               /* newest step committed in epoch gE */
byte gdrop;             /* the epoch of the last drop a majority took (0: none) */
byte gdec;              /* the epoch of the last drop decided, taken by a majority or not */

/* scratch, always 0 between steps */
HIDDEN byte ar, ai, an, xc, xcs, xn, xf, xtv, xu0, xu1, xgr, xgv, xe, xst, xv, xci, xk, xpk, xrk, xdm;

/* ---------------- derived ---------------- */
#define VKEY(r,x) (ve[VI(r,x)]*4 + vs[VI(r,x)])      /* (epoch, step) order */
#define CK(x) (cme[x]*4 + cms[x])
#define CV(n,r) cmv[cr[n]*NR + (r)]                   /* version of rank r in n's commit */
/* the coordinator: the first live daemon in the rendezvous order CO1, CO2, CO3 */
#ifndef CO1
#define CO1 0
#define CO2 1
#define CO3 2
#endif
#define COORD (up[CO1] -> CO1 : (up[CO2] -> CO2 : (up[CO3] -> CO3 : NOCOORD)))
#define LIVE(n) (!lost[n])
#define UPN(n) (up[n])
#define SV(r,i) slv[SI(r,i)]

/* RELEASABLE: a newer step is committed, its epoch is void, or the step is dead */
#define OLDER(n,r,x) (VKEY(r,x) < CK(cr[n]))
#define VOIDV(n,r,x) (ve[VI(r,x)] < ep[n])
#define DEADV(n,r,x) (ve[VI(r,x)] == ep[n] && (dead[n] & (1 << vs[VI(r,x)])))
#define RELEASABLE(n,r,x) ((x) != CV(n,r) && (OLDER(n,r,x) || VOIDV(n,r,x) || DEADV(n,r,x)))

#ifdef POLICY_WAIT
#define OVERWRITE_PROT(r,i) 0
#else
/* skip policy: a PROTECTED step that is not committed may be overwritten */
#define OVERWRITE_PROT(r,i) (sst[SI(r,i)] == PROT && SV(r,i) != CV(r,r))
#endif
#define USABLE(r,i) (SV(r,i) == 0 || (!fresh[r] && (RELEASABLE(r,r,SV(r,i)) || OVERWRITE_PROT(r,i))))
#define SKEY(r,i) (SV(r,i) == 0 -> 0 : VKEY(r,SV(r,i)))
#define NEWV(r) (SKEY(r,0) >= SKEY(r,1) -> SV(r,0) : SV(r,1))
/* wait policy: the newest sealed step, newer than the commit, of the current epoch, not dead */
#define PENDING(r,x) ((x) != 0 && ve[VI(r,x)] == ep[r] && VKEY(r,x) > CK(cr[r]) && !DEADV(r,r,x))
#define WAITBLOCK(r) (POLWAIT && PENDING(r, NEWV(r)))
#define CANSEAL(r) (up[r] && (USABLE(r,0) || USABLE(r,1)) && !WAITBLOCK(r))
#ifdef LOCKSTEP
/* data-parallel ranks in lockstep: step s ends only when every rank ended step s-1 */
#define STEPOK(r) (ts[1-(r)] == RUN && tstep[1-(r)] >= tstep[r])
#else
#define STEPOK(r) 1
#endif
#define CANSNAP(r) (ts[r] == RUN && tstep[r] <= NS && STEPOK(r) && CANSEAL(r))
#define CANSKIP(r) (!POLWAIT && ts[r] == RUN && tstep[r] <= NS && STEPOK(r) && !CANSEAL(r))

/* restorable: its owner holds it sealed, or k = 1 fragment is on a node counted by L */
#define RST(r,x,L) ((x) != 0 && ((L(r) && (SV(r,0) == (x) || SV(r,1) == (x))) || \
                    (L(H1(r)) && (fr[FI(H1(r),r)] & (1 << (x)))) || (L(2) && (fr[FI(2,r)] & (1 << (x))))))
#define CRST(x,L) (RST(0, cmv[(x)*NR+0], L) && RST(1, cmv[(x)*NR+1], L))

/* the newest commit record a live daemon knows */
/* a commit that a drop voided no longer counts: the operator asked for it to go (a drop that no
   majority took may or may not take effect, as the operator is told: ask again) */
#define LCR(n) ((up[n] && cme[cr[n]] > gdec) -> cr[n] : 0)
#define MX(a,b) (CK(a) >= CK(b) -> (a) : (b))
#define GCR MX(MX(LCR(0), LCR(1)), LCR(2))
#define INV1 (nloss > M || GCR == 0 || CRST(GCR, LIVE))

#define VIOLATION(msg) printf(msg); printf("\n"); assert(false)

/* dead steps: as written, those strictly between two consecutive steps p < q that a rank sealed;
   FIX_DEAD_FIRST: also those below a rank's first step q in the epoch (p = -1) */
#define DEADFROM(p) ((p) == PNONE -> (FIX_DEAD_FIRST -> 0 : 9) : (p))

#ifdef BUG_NO_FENCE
#define FENCE_REPORTS(n) rstale[n] = rstale[n] | rset[n]; rset[n] = 0
#else
#define FENCE_REPORTS(n) rset[n] = 0
#endif

/* ---------------- helpers ---------------- */
inline resend_all() {
  rsent[0] = 0; rsent[1] = 0; rsent[2] = 0; rsent[3] = 0; rqsent[0] = 0; rqsent[1] = 0;
  jqsent[0] = 0; jqsent[1] = 0
}

inline adopt_epoch(nn, ee) {
  ep[nn] = ee; dead[nn] = 0; crep[FI(nn,0)] = 0; crep[FI(nn,1)] = 0; chas[nn] = 0; crest[nn] = 0;
  crun[FI(nn,0)] = 0; crun[FI(nn,1)] = 0
}

#ifdef BUG_DROP_COMMITTED
/* broken: a holder also drops the committed step's fragments once their epoch is old */
#define GC_BUG(n,r,x) VOIDV(n,r,x)
#else
#define GC_BUG(n,r,x) 0
#endif
/* a holder drops fragments older than the commit, of void epochs, and of dead steps */
inline holder_gc(nn) {
  xgr = 0;
  do
  :: xgr < NR ->
     if
     :: xgr != nn && fr[FI(nn,xgr)] != 0 ->
        xgv = 1;
        do
        :: xgv < NV ->
           if
           :: (fr[FI(nn,xgr)] & (1 << xgv)) && (RELEASABLE(nn, xgr, xgv) || GC_BUG(nn, xgr, xgv)) ->
              fr[FI(nn,xgr)] = fr[FI(nn,xgr)] & ~(1 << xgv)
           :: else
           fi;
           xgv++
        :: else -> break
        od
     :: else
     fi;
     xgr++
  :: else -> break
  od;
  xgr = 0; xgv = 0
}

/* ---------------- dropping the job (docs/PROTOCOL.md, Dropping a job) ----------------
 * A drop at epoch E voids every commit, shard and fragment of an epoch up to E.  Each daemon keeps
 * the drop (dr[n], soft state: lost when it crashes) and every JobState carries it.  A commit
 * record of the dropped history is never adopted (NOTDROPPED); once a later run commits, the drop
 * is forgotten (DROP_GC: that commit outranks every record the drop voided). */
#define NOTDROPPED(c, d) ((c) == 0 || cme[c] > (d))
#define DROP_GC(n) if :: dr[n] != 0 && cr[n] != 0 && cme[cr[n]] > dr[n] -> dr[n] = 0 :: else fi
#ifdef BUG_DROP_FORGOTTEN
/* broken: a coordinator does not learn drops from the daemons it gathers the job's state from */
#define LEARNS_DROPS 0
#else
#define LEARNS_DROPS 1
#endif

/* node nn deletes its fragments of epochs up to dd (a fragment carries its shard's epoch) */
inline drop_fragments_upto(nn, dd) {
  xgr = 0;
  do
  :: xgr < NR ->
     xgv = 1;
     do
     :: xgv < NV ->
        if
        :: (fr[FI(nn,xgr)] & (1 << xgv)) && ve[VI(xgr,xgv)] <= dd ->
           fr[FI(nn,xgr)] = fr[FI(nn,xgr)] & ~(1 << xgv)
        :: else
        fi;
        xgv++
     :: else -> break
     od;
     xgr++
  :: else -> break
  od;
  xgr = 0; xgv = 0
}

/* node nn learns the drop at epoch dd from a JobState of epoch je: it deletes its slots and its
   fragments of epochs up to dd; a later run's stay */
inline apply_drop(nn, je, dd) {
  if
  :: dd > dr[nn] && (cr[nn] == 0 || cme[cr[nn]] <= dd) ->
     printf("TRACE node %d learns the drop at epoch %d\n", nn, dd);
     drop_fragments_upto(nn, dd);
     dr[nn] = dd; cr[nn] = 0;
     if :: ep[nn] < dd -> adopt_epoch(nn, dd) :: else fi;
     if
     :: nn < NR ->
        if :: SV(nn,0) != 0 && ve[VI(nn,SV(nn,0))] <= dd -> SV(nn,0) = 0; sst[SI(nn,0)] = 0; spk[SI(nn,0)] = 0 :: else fi;
        if :: SV(nn,1) != 0 && ve[VI(nn,SV(nn,1))] <= dd -> SV(nn,1) = 0; sst[SI(nn,1)] = 0; spk[SI(nn,1)] = 0 :: else fi
     :: else
     fi;
     fresh[nn] = 0
  :: else
  fi
}

/* coordinator cc learns the drop known by daemon nn (ListHeld answers carry it): its commit of
   the dropped history is void, and it never adopts one again */
inline learn_drop(cc, nn) {
  if
  :: LEARNS_DROPS && dr[nn] > dr[cc] && (cr[cc] == 0 || cme[cr[cc]] <= dr[nn]) ->
     dr[cc] = dr[nn]; cr[cc] = 0;
     if :: ep[cc] < dr[cc] -> adopt_epoch(cc, dr[cc]) :: else fi
  :: else
  fi
}

/* a JobState (reply or push) reaches nn: it adopts a newer epoch and a newer commit */
inline apply_js(nn, je, jc, jd, jdrop) {
  printf("TRACE node %d gets JobState(epoch %d, commit step %d of epoch %d, dropped at %d)\n", nn, je, cms[jc], cme[jc], jdrop);
  apply_drop(nn, je, jdrop);
  if
  :: je > ep[nn] -> adopt_epoch(nn, je); dead[nn] = jd
  :: je == ep[nn] -> dead[nn] = dead[nn] | jd
  :: else
  fi;
  if
  :: CK(jc) > CK(cr[nn]) && NOTDROPPED(jc, dr[nn]) -> cr[nn] = jc
  :: else
  fi;
  DROP_GC(nn);
  fresh[nn] = 0;
  holder_gc(nn)
}

/* coordinator cc sends its JobState to the daemons in mask dm: delivered at once, or (a fault)
   delayed in flight or lost */
inline send_state(cc, dm) {
  xn = 0;
  do
  :: xn < NN ->
     if
     :: (dm & (1 << xn)) && up[xn] ->
        if
        :: true -> xf = 0
        :: xn != cc && MF(2) -> xf = 1
        :: xn != cc && LOSSF -> xf = 2
        fi;
        if
        :: xf == 0 -> apply_js(xn, ep[cc], cr[cc], dead[cc], dr[cc])
        :: xf == 1 -> nmsgf++; printf("TRACE FAULT a JobState to node %d is delayed\n", xn);
           jv[JI(xn,cc)] = 1; jep[JI(xn,cc)] = ep[cc]; jci[JI(xn,cc)] = cr[cc];
           jdd[JI(xn,cc)] = dead[cc]; jsi[JI(xn,cc)] = inc[cc]; jdr[JI(xn,cc)] = dr[cc]
        :: xf == 2 -> nmsgf++; resend_all(); printf("TRACE FAULT a JobState to node %d is lost\n", xn)
        fi
     :: else
     fi;
     xn++
  :: else -> break
  od;
  xn = 0; xf = 0
}

inline new_epoch(cc) {
  gE++;
  if :: gE > 15 -> printf("VIOLATION model_bound: more epochs than the model holds\n"); assert(false) :: else fi;
  adopt_epoch(cc, gE);
  gsl[1] = 0; gsl[2] = 0; gsl[3] = 0; gcm = 0
}

inline add_commit(ee, ss, a0, a1) {
  xci = 1;
  do
  :: xci <= ncm && cme[xci] == ee && cms[xci] == ss && cmv[xci*NR] == a0 && cmv[xci*NR+1] == a1 -> break
  :: xci <= ncm && !(cme[xci] == ee && cms[xci] == ss && cmv[xci*NR] == a0 && cmv[xci*NR+1] == a1) -> xci++
  :: xci > ncm ->
     assert(ncm + 1 < NC);   /* a model bound, not a property */
     ncm++; cme[ncm] = ee; cms[ncm] = ss; cmv[ncm*NR] = a0; cmv[ncm*NR+1] = a1; break
  od
}

#ifdef BUG_NO_EPOCH
#define EPMATCH(r,x,ee) 1
#else
#define EPMATCH(r,x,ee) (ve[VI(r,x)] == (ee))
#endif

/* ReportProtected(rank rr, version vv, prev known pp) at coordinator cc */
inline coord_report(cc, rr, vv, pp) {
  xe = ve[VI(rr,vv)]; xst = vs[VI(rr,vv)]; xdm = (1 << rr);
  printf("TRACE coordinator %d (epoch %d) gets ReportProtected rank %d step %d epoch %d content %d\n", cc, ep[cc], rr, xst, xe, vc[VI(rr,vv)]);
#ifdef BUG_NO_EPOCH
  if :: xe < ep[cc] -> xe = ep[cc] :: else fi;      /* broken: reports are not filtered by epoch */
#endif
  if
  :: xe < ep[cc] || xe <= dr[cc] -> skip   /* an older or dropped epoch: answered with the current state, otherwise ignored */
  :: else ->
     if :: xe > ep[cc] -> adopt_epoch(cc, xe) :: else fi;   /* not said; a newer epoch is adopted */
     crep[FI(cc,rr)] = crep[FI(cc,rr)] | (1 << vv);
     /* dead steps: DropSteps to the holders */
     if
     :: pp && DEADFROM(vp[VI(rr,vv)]) + 1 < xst ->
        xk = DEADFROM(vp[VI(rr,vv)]) + 1;
        do
        :: xk < xst -> dead[cc] = dead[cc] | (1 << xk); xk++
        :: else -> break
        od;
        xk = 0; xdm = 7
     :: else
     fi;
     /* step xst of epoch xe commits when every rank reported it */
     xu0 = 0; xu1 = 0; xtv = 1;
     do
     :: xtv < NV ->
        if
        :: xu0 == 0 && (crep[FI(cc,0)] & (1 << xtv)) && vs[VI(0,xtv)] == xst && EPMATCH(0,xtv,xe) -> xu0 = xtv
        :: else
        fi;
        if
        :: xu1 == 0 && (crep[FI(cc,1)] & (1 << xtv)) && vs[VI(1,xtv)] == xst && EPMATCH(1,xtv,xe) -> xu1 = xtv
        :: else
        fi;
        xtv++
     :: else -> break
     od;
     if
     :: xu0 != 0 && xu1 != 0 && xe*4 + xst > CK(cr[cc]) ->
        if
        :: vc[VI(0,xu0)] != vc[VI(1,xu1)] -> VIOLATION("VIOLATION no_mix: a commit names shards of two histories")
        :: else
        fi;
        add_commit(xe, xst, xu0, xu1);
        cr[cc] = xci;
        DROP_GC(cc);
        printf("TRACE coordinator %d COMMITS step %d of epoch %d (contents %d,%d)\n", cc, xst, xe, vc[VI(0,xu0)], vc[VI(1,xu1)]);
        if :: xe == gE && xst > gcm -> gcm = xst :: else fi;
        /* reports up to the committed step no longer matter */
        crep[FI(cc,0)] = crep[FI(cc,0)] & ~((1 << (xu0 + 1)) - 1);
        crep[FI(cc,1)] = crep[FI(cc,1)] & ~((1 << (xu1 + 1)) - 1);
        xdm = 7;                   /* Commit to every node of the job */
        xci = 0
     :: else
     fi;
     xtv = 0; xu0 = 0; xu1 = 0
  fi;
  send_state(cc, xdm);             /* the JobState reply (and pushes) */
  xe = 0; xst = 0; xdm = 0
}

/* rank rr's owner sends ReportProtected(version x, prev known pk) to the coordinator: processed
   at once, or (a fault) delayed in flight or lost */
inline send_report(rr, x, pk) {
  xcs = COORD;
  if
  :: xcs == NOCOORD -> xf = 2
  :: xcs != NOCOORD -> xf = 0
  :: xcs != NOCOORD && xcs != rr && MF(1) -> xf = 1
  :: xcs != NOCOORD && xcs != rr && LOSSF -> xf = 3
  fi;
  if
  :: xf == 0 -> xf = 0; coord_report(xcs, rr, x, pk)
  :: xf == 1 -> xf = 0; nmsgf++; rset[rr] = rset[rr] | (1 << (x*2 + pk));
     printf("TRACE FAULT the report of rank %d step %d epoch %d is delayed\n", rr, vs[VI(rr,x)], ve[VI(rr,x)])
  :: xf == 2 -> xf = 0
  :: xf == 3 -> xf = 0; nmsgf++; resend_all(); printf("TRACE FAULT a report is lost\n")
  fi;
  xcs = 0
}

/* the asker (rank rr's daemon) receives the restore answer: restore point pp, epoch ee, from the
   incarnation sn of the coordinator, for trainer run rn */
#define REALFENCED(snd) ((snd) % 4 != inc[(snd) / 4])
#ifdef BUG_NO_FENCE
/* broken: a message of an incarnation that has since restarted is accepted */
#define ON_FENCED(snd) :: REALFENCED(snd) -> VIOLATION("VIOLATION fencing: a message of a fenced incarnation is accepted")
#else
#define ON_FENCED(snd) :: REALFENCED(snd) -> skip
#endif
inline apply_answer(rr, ee, pp, sn, rn) {
  if
  ON_FENCED(sn)
  :: else ->
     printf("TRACE node %d gets the restore answer: step %d of epoch %d, epoch %d\n", rr, cms[pp], cme[pp], ee);
     if :: ee > ep[rr] -> adopt_epoch(rr, ee) :: else fi;
     if :: CK(pp) > CK(cr[rr]) -> cr[rr] = pp :: else fi;    /* not said; the asker adopts it */
     if
     :: ts[rr] == RESUMING && rn == nrun ->
        /* the asker's owner drops the asking rank's sealed steps after the restore point (when
           it hands the answer to the trainer: a late duplicate answer drops nothing) */
        if :: SV(rr,0) != 0 && vs[VI(rr,SV(rr,0))] > cms[pp] -> SV(rr,0) = 0; sst[SI(rr,0)] = 0; spk[SI(rr,0)] = 0 :: else fi;
        if :: SV(rr,1) != 0 && vs[VI(rr,SV(rr,1))] > cms[pp] -> SV(rr,1) = 0; sst[SI(rr,1)] = 0; spk[SI(rr,1)] = 0 :: else fi;
        /* PrepareRestore: the committed shard, checked against the committed CRC */
        if
        :: pp != 0 && !RST(rr, cmv[pp*NR + rr], LIVE) && nloss <= M ->
           VIOLATION("VIOLATION restorable: PrepareRestore cannot make the committed shard local")
        :: else
        fi;
        if
        :: !runset -> runset = 1; runrp = pp
        :: runset && (cms[runrp] != cms[pp] || cmv[runrp*NR] != cmv[pp*NR] || cmv[runrp*NR+1] != cmv[pp*NR+1]) ->
           VIOLATION("VIOLATION consistent_restart: the ranks of one restart restored different steps")
        :: else
        fi;
        lin[rr] = nrun;
        tstep[rr] = cms[pp] + 1;
        ts[rr] = RUN
     :: else
     fi
  fi
}

#ifdef BUG_PARTIAL_VIEW
/* broken: the answer is given from whoever answered, without waiting for every job node */
#define VIEWDONE(c) (pmask[c] != 0)
#else
/* complete: every job node answered or is declared dead by membership */
#define VIEWDONE(c) ((pmask[c] & 1 || !up[0]) && (pmask[c] & 2 || !up[1]) && (pmask[c] & 4 || !up[2]))
#endif
#define SOMEDOWN ((!up[0] && !lost[0]) || (!up[1] && !lost[1]) || (!up[2] && !lost[2]))
/* FIX_EPOCH_RULE: some live daemon holds a shard (slot or fragment) of epoch e */
#define HASE(r,x,e) ((x) != 0 && ve[VI(r,x)] == (e))
#define FRE(n,r,e) (fr[FI(n,r)] != 0 && ((HASE(r,1,e) && (fr[FI(n,r)] & 2)) || (HASE(r,2,e) && (fr[FI(n,r)] & 4)) || \
   (HASE(r,3,e) && (fr[FI(n,r)] & 8)) || (HASE(r,4,e) && (fr[FI(n,r)] & 16)) || (HASE(r,5,e) && (fr[FI(n,r)] & 32)) || \
   (HASE(r,6,e) && (fr[FI(n,r)] & 64))))
#define NONEMPTY(e) ((up[0] && (HASE(0,SV(0,0),e) || HASE(0,SV(0,1),e) || FRE(0,1,e))) || \
                     (up[1] && (HASE(1,SV(1,0),e) || HASE(1,SV(1,1),e) || FRE(1,0,e))) || \
                     (up[2] && (FRE(2,0,e) || FRE(2,1,e))))

/* FIX_COORD_VIEW: a daemon that becomes coordinator (a restart, or a membership change) first
   learns the job's epoch and commit from a complete view (ListHeld answers carry each daemon's
   epoch); reports it refused meanwhile are sent again.  Modelled as done at the takeover. */
inline takeover() {
  xc = COORD;
  if
  :: FIX_COORD_VIEW && xc != NOCOORD ->
#ifdef BUG_PARTIAL_VIEW
     xn = NN;                          /* broken: nobody else is waited for */
#else
     xn = 0;
#endif
     xk = xn;
     do
     :: xn < NN -> if :: up[xn] -> learn_drop(xc, xn) :: else fi; xn++
     :: else -> break
     od;
     xn = xk; xk = 0;
     do
     :: xn < NN ->
        if :: up[xn] && ep[xn] > ep[xc] -> adopt_epoch(xc, ep[xn]) :: else fi;
        if :: up[xn] && CK(cr[xn]) > CK(cr[xc]) && NOTDROPPED(cr[xn], dr[xc]) -> cr[xc] = cr[xn] :: else fi;
        xn++
     :: else -> break
     od;
     xn = 0
  :: else
  fi;
  xc = 0
}

/* a report in flight (set S) from rank ar reaches coordinator xc: pick any, maybe duplicate it */
#define DELIVER_ONE(S) \
       xk = 2; \
       do \
       :: (S[ar] & (1 << xk)) -> break \
       :: (S[ar] & (1 << xk)) && (S[ar] >> (xk+1)) != 0 -> xk++ \
       :: !(S[ar] & (1 << xk)) -> xk++ \
       od; \
       xv = xk / 2; xpk = xk % 2; \
       if \
       :: MF(1) -> nmsgf++ \
       :: true -> S[ar] = S[ar] & ~(1 << xk) \
       fi; \
       xk = 0; \
       coord_report(xc, ar, xv, xpk);

/* ---------------- the system ---------------- */
#define TDONE(r) (ts[r] == TDEAD || ts[r] == TSTOP || (ts[r] == RUN && tstep[r] > NS))
#define CDONE(s) ((s) > NS || gsl[s] != 3 || gcm >= (s))
#define DONE (TDONE(0) && TDONE(1) && CDONE(1) && CDONE(2) && CDONE(3))

/* FIX_REFUSAL: a holder that refuses a fragment of an older epoch answers with its epoch */
#define TEACHES(h,r,x) (FIX_STUCK && up[h] && ve[VI(r,x)] < ep[h] && ep[h] > ep[r])
#define PROTECTABLE(r,i) (up[r] && SV(r,i) != 0 && sst[SI(r,i)] == SEALED && \
    ((ACCEPTS(H1(r),r,SV(r,i)) && !HASF(H1(r),r,SV(r,i))) || (ACCEPTS(H2(r),r,SV(r,i)) && !HASF(H2(r),r,SV(r,i))) || \
     (ACCEPTS(H1(r),r,SV(r,i)) && ACCEPTS(H2(r),r,SV(r,i))) || TEACHES(H1(r),r,SV(r,i)) || TEACHES(H2(r),r,SV(r,i))))
#define ACCEPTS(h,r,x) (up[h] && ve[VI(r,x)] >= ep[h])
#define HASF(h,r,x) (fr[FI(h,r)] & (1 << (x)))
#define REPORTABLE(r,i) (up[r] && SV(r,i) != 0 && sst[SI(r,i)] == PROT && !rsent[SI(r,i)] && \
   ve[VI(r,SV(r,i))] == ep[r] && VKEY(r,SV(r,i)) > CK(cr[r]) && !DEADV(r,r,SV(r,i)))
#define OWNERWORK(r,i) (PROTECTABLE(r,i) || REPORTABLE(r,i))

active proctype system() {
  /* the job has started: both ranks resumed in epoch 1 at coordinator 0, nothing committed */
  atomic {
    up[0] = 1; up[1] = 1; up[2] = 1;
    nv[0] = 1; nv[1] = 1;
    gE = 1; ep[0] = 1; ep[1] = 1; ep[2] = 1; chas[CO1] = 1; crest[CO1] = 3; crun[FI(CO1,0)] = 1; crun[FI(CO1,1)] = 1;
    ts[0] = RUN; ts[1] = RUN; tstep[0] = 1; tstep[1] = 1; runset = 1
  }
end:
  do
  /* a trainer ends its next step: BeginSnapshot, copy, seal (or skip it) */
  :: atomic {
       CANSNAP(0) || CANSNAP(1) || CANSKIP(0) || CANSKIP(1) ->
       if
       :: CANSNAP(0) -> ar = 0; ai = 1
       :: CANSNAP(1) -> ar = 1; ai = 1
       :: CANSKIP(0) -> ar = 0; ai = 0
       :: CANSKIP(1) -> ar = 1; ai = 0
       fi;
       if
       :: ai == 1 ->
          if
          :: USABLE(ar,0) && (!USABLE(ar,1) || SKEY(ar,0) <= SKEY(ar,1)) -> ai = 0
          :: else -> ai = 1
          fi;
          xk = NEWV(ar);               /* the newest slot header: the previous step sealed */
          xv = nv[ar]; assert(xv < NV); nv[ar]++;
          vs[VI(ar,xv)] = tstep[ar]; ve[VI(ar,xv)] = ep[ar]; vc[VI(ar,xv)] = lin[ar];
          vp[VI(ar,xv)] = ((xk != 0 && ve[VI(ar,xk)] == ep[ar]) -> vs[VI(ar,xk)] : PNONE);
          SV(ar,ai) = xv; sst[SI(ar,ai)] = SEALED; spk[SI(ar,ai)] = 1; rsent[SI(ar,ai)] = 0;
             if :: ep[ar] == gE -> gsl[tstep[ar]] = gsl[tstep[ar]] | (1 << ar) :: else fi;
          printf("TRACE rank %d seals step %d in epoch %d (content of run %d, prev %d) on node %d\n", ar, tstep[ar], ep[ar], lin[ar], vp[VI(ar,xv)], ar)
       :: else ->                      /* skip policy: no slot may be used, the step is skipped */
          printf("TRACE rank %d skips step %d\n", ar, tstep[ar])
       fi;
       tstep[ar]++;
       ar = 0; ai = 0; xv = 0; xk = 0
     }
  /* an owner protects a sealed shard (PutFragment to both holders) or re-sends a report */
  :: atomic {
       OWNERWORK(0,0) || OWNERWORK(0,1) || OWNERWORK(1,0) || OWNERWORK(1,1) ->
       if
       :: OWNERWORK(0,0) -> ar = 0; ai = 0
       :: OWNERWORK(0,1) -> ar = 0; ai = 1
       :: OWNERWORK(1,0) -> ar = 1; ai = 0
       :: OWNERWORK(1,1) -> ar = 1; ai = 1
       fi;
       xv = SV(ar,ai);
       if
       :: PROTECTABLE(ar,ai) ->
          /* a holder refuses an epoch older than it knows for J */
          if :: ACCEPTS(H1(ar),ar,xv) -> fr[FI(H1(ar),ar)] = fr[FI(H1(ar),ar)] | (1 << xv) :: else fi;
          if :: ACCEPTS(H2(ar),ar,xv) -> fr[FI(H2(ar),ar)] = fr[FI(H2(ar),ar)] | (1 << xv) :: else fi;
          if :: TEACHES(H1(ar),ar,xv) -> adopt_epoch(ar, ep[H1(ar)]) :: else fi;
          if :: TEACHES(H2(ar),ar,xv) -> adopt_epoch(ar, ep[H2(ar)]) :: else fi;
          if
          :: ACCEPTS(H1(ar),ar,xv) && ACCEPTS(H2(ar),ar,xv) -> sst[SI(ar,ai)] = PROT;
             printf("TRACE rank %d step %d epoch %d is PROTECTED (fragments on nodes %d and 2)\n", ar, vs[VI(ar,xv)], ve[VI(ar,xv)], H1(ar))
          :: else -> printf("TRACE rank %d step %d epoch %d: a holder refused or is down\n", ar, vs[VI(ar,xv)], ve[VI(ar,xv)])
          fi
       :: else
       fi;
       if
       :: REPORTABLE(ar,ai) -> rsent[SI(ar,ai)] = 1; xpk = spk[SI(ar,ai)]; send_report(ar, xv, xpk)
       :: else
       fi;
       ar = 0; ai = 0; xv = 0; xpk = 0
     }
  /* a delayed or duplicated report arrives at the coordinator */
  :: atomic {
       (rset[0] != 0 || rset[1] != 0) && COORD != NOCOORD ->
       if
       :: rset[0] != 0 -> ar = 0
       :: rset[1] != 0 -> ar = 1
       fi;
       xc = COORD;
       DELIVER_ONE(rset)
       ar = 0; xc = 0; xv = 0; xpk = 0
     }
#ifdef BUG_NO_FENCE
  /* broken: a report of an incarnation that has since restarted is counted */
  :: atomic {
       (rstale[0] != 0 || rstale[1] != 0) && COORD != NOCOORD ->
       if
       :: rstale[0] != 0 -> ar = 0
       :: rstale[1] != 0 -> ar = 1
       fi;
       xc = COORD;
       printf("VIOLATION fencing: a report of a fenced incarnation is counted\n");
       assert(false);
       DELIVER_ONE(rstale)
       ar = 0; xc = 0; xv = 0; xpk = 0
     }
#endif
  /* a delayed or duplicated JobState arrives */
  :: atomic {
       (jv[1] && up[0]) || (jv[2] && up[0]) || (jv[3] && up[1]) || (jv[5] && up[1]) || (jv[6] && up[2]) || (jv[7] && up[2]) ->
       if
       :: jv[1] && up[0] -> an = 0; xc = 1
       :: jv[2] && up[0] -> an = 0; xc = 2
       :: jv[3] && up[1] -> an = 1; xc = 0
       :: jv[5] && up[1] -> an = 1; xc = 2
       :: jv[6] && up[2] -> an = 2; xc = 0
       :: jv[7] && up[2] -> an = 2; xc = 1
       fi;
       if
       ON_FENCED(xc*4 + jsi[JI(an,xc)])
       :: else -> apply_js(an, jep[JI(an,xc)], jci[JI(an,xc)], jdd[JI(an,xc)], jdr[JI(an,xc)])
       fi;
       if
       :: MF(2) -> nmsgf++
       :: true -> jv[JI(an,xc)] = 0; jep[JI(an,xc)] = 0; jci[JI(an,xc)] = 0; jdd[JI(an,xc)] = 0; jsi[JI(an,xc)] = 0; jdr[JI(an,xc)] = 0
       fi;
       an = 0; xc = 0
     }
  /* FIX_STUCK: a restarted owner asks the coordinator for J's JobState (it does not wait for a
     report of its own to be answered: it may have none to send) */
  :: atomic {
       FIX_STUCK && COORD != NOCOORD && ((up[0] && fresh[0] && !jqsent[0]) || (up[1] && fresh[1] && !jqsent[1])) ->
       if
       :: up[0] && fresh[0] && !jqsent[0] -> ar = 0
       :: up[1] && fresh[1] && !jqsent[1] -> ar = 1
       fi;
       jqsent[ar] = 1;
       xc = COORD;
       send_state(xc, (1 << ar));
       ar = 0; xc = 0
     }
  /* ResolveRestore(J, W, r, resume) from rank r's daemon */
  :: atomic {
       (ts[0] == RESUMING && up[0] && !rqsent[0]) || (ts[1] == RESUMING && up[1] && !rqsent[1]) ->
       if
       :: ts[0] == RESUMING && up[0] && !rqsent[0] -> ar = 0
       :: ts[1] == RESUMING && up[1] && !rqsent[1] -> ar = 1
       fi;
       rq[ar] = 1; rqc[ar] = cr[ar]; rqi[ar] = ar*4 + inc[ar]; rqn[ar] = nrun; rqsent[ar] = 1;
       printf("TRACE rank %d asks ResolveRestore(resume)\n", ar);
       ar = 0
     }
  /* the coordinator takes up a request */
  :: atomic {
       (rq[0] || rq[1]) && COORD != NOCOORD && preq[COORD] == 0 ->
       if
       :: rq[0] -> ar = 0
       :: rq[1] -> ar = 1
       fi;
       xc = COORD;
       if
       ON_FENCED(rqi[ar])
       :: else ->
          preq[xc] = ar + 1; prun[xc] = rqn[ar];
          pmask[xc] = (1 << xc);
          if :: CK(rqc[ar]) > CK(cr[xc]) && NOTDROPPED(rqc[ar], dr[xc]) -> cr[xc] = rqc[ar] :: else fi
       fi;
       if
       :: MF(4) -> nmsgf++
       :: true -> rq[ar] = 0; rqc[ar] = 0; rqi[ar] = 0; rqn[ar] = 0
       fi;
       ar = 0; xc = 0
     }
  /* a daemon answers ListHeld(J): its commit record (shards and fragments: see decide) */
  :: atomic {
       COORD != NOCOORD && preq[COORD] != 0 &&
       ((up[0] && !(pmask[COORD] & 1)) || (up[1] && !(pmask[COORD] & 2)) || (up[2] && !(pmask[COORD] & 4))) ->
       xc = COORD;
       if
       :: up[0] && !(pmask[xc] & 1) -> an = 0
       :: up[1] && !(pmask[xc] & 2) -> an = 1
       :: up[2] && !(pmask[xc] & 4) -> an = 2
       fi;
       pmask[xc] = pmask[xc] | (1 << an);
       learn_drop(xc, an);
       if :: CK(cr[an]) > CK(cr[xc]) && NOTDROPPED(cr[an], dr[xc]) -> cr[xc] = cr[an] :: else fi;
       if :: FIX_COORD_VIEW && ep[an] > ep[xc] -> adopt_epoch(xc, ep[an]) :: else fi;
       an = 0; xc = 0
     }
  /* the coordinator answers the restore point from the complete view */
  :: atomic {
       COORD != NOCOORD && preq[COORD] != 0 && VIEWDONE(COORD) &&
       (cr[COORD] == 0 || CRST(cr[COORD], UPN) || !SOMEDOWN) ->
       xc = COORD;
       xrk = preq[xc] - 1;
       xci = cr[xc];
       printf("TRACE coordinator %d answers rank %d: restore point step %d of epoch %d\n", xc, xrk, cms[xci], cme[xci]);
       if
       :: gdrop != 0 && xci != 0 && cme[xci] <= gdrop ->
          VIOLATION("VIOLATION drop_final: a restore answer resumes a step from before the drop")
       :: else
       fi;
       if
       :: CK(LCR(0)) > CK(xci) || CK(LCR(1)) > CK(xci) || CK(LCR(2)) > CK(xci) ->
          VIOLATION("VIOLATION never_behind: a restore answer is older than a commit a live daemon knows")
       :: else
       fi;
       if
       :: xci != 0 && !CRST(xci, UPN) && nloss <= M ->
          VIOLATION("VIOLATION restorable: DATA_LOSS for the newest commit with at most m nodes lost")
       :: else
       fi;
       if
       :: xci != 0 && (vc[VI(0,cmv[xci*NR])] != vc[VI(1,cmv[xci*NR+1])] || ve[VI(0,cmv[xci*NR])] != ve[VI(1,cmv[xci*NR+1])]) ->
          VIOLATION("VIOLATION no_mix: a restore point names shards of two histories")
       :: else
       fi;
       /* epochs */
#if FIX_EPOCH_RULE
       /* a new epoch iff the current one may hold a shard (one is in the view, or a daemon that
          will come back did not answer): a restarted history; unless this is a retry of a resume
          already answered in this epoch (same trainer incarnation) */
       if
       :: crun[FI(xc,xrk)] != prun[xc] + 1 && (NONEMPTY(ep[xc]) || SOMEDOWN || ep[xc] <= dr[xc]) -> new_epoch(xc)
       :: else
       fi;
       crun[FI(xc,xrk)] = prun[xc] + 1;
#else
       /* as written: a rank that already resumed in this epoch restarts it; a coordinator with no
          record of the restorers cannot tell a restart from a join */
       if
       :: !chas[xc] || (crest[xc] & (1 << xrk)) -> new_epoch(xc); chas[xc] = 1; crest[xc] = (1 << xrk)
       :: else -> crest[xc] = crest[xc] | (1 << xrk)
       fi;
#endif
#if FIX_COORD_VIEW
       /* every live daemon of the job learns the epoch (and the commit) before the answer */
       xn = 0;
       do
       :: xn < NN ->
          if :: up[xn] -> apply_drop(xn, ep[xc], dr[xc]) :: else fi;
          if :: up[xn] && ep[xn] < ep[xc] -> adopt_epoch(xn, ep[xc]) :: else fi;
          if :: up[xn] && CK(cr[xn]) < CK(cr[xc]) && NOTDROPPED(cr[xc], dr[xn]) -> cr[xn] = cr[xc] :: else fi;
          if :: up[xn] -> DROP_GC(xn) :: else fi;
          xn++
       :: else -> break
       od;
       xn = 0;
#endif
       preq[xc] = 0; pmask[xc] = 0; xk = prun[xc]; prun[xc] = 0;
       if
       :: !up[xrk] -> xf = 2
       :: up[xrk] -> xf = 0
       :: up[xrk] && xrk != xc && MF(4) -> xf = 1
       :: up[xrk] && xrk != xc && LOSSF -> xf = 3
       fi;
       if
       :: xf == 0 -> apply_answer(xrk, ep[xc], xci, xc*4 + inc[xc], xk)
       :: xf == 1 -> nmsgf++; ra[xrk] = 1; rae[xrk] = ep[xc]; rap[xrk] = xci; ras[xrk] = xc*4 + inc[xc]; rar[xrk] = xk
       :: xf == 2 -> skip
       :: xf == 3 -> nmsgf++; resend_all()
       fi;
       xf = 0; xc = 0; xrk = 0; xci = 0; xk = 0
     }
  /* a delayed or duplicated restore answer arrives */
  :: atomic {
       (ra[0] && up[0]) || (ra[1] && up[1]) ->
       if
       :: ra[0] && up[0] -> ar = 0
       :: ra[1] && up[1] -> ar = 1
       fi;
       apply_answer(ar, rae[ar], rap[ar], ras[ar], rar[ar]);
       if
       :: MF(4) -> nmsgf++
       :: true -> ra[ar] = 0; rae[ar] = 0; rap[ar] = 0; ras[ar] = 0; rar[ar] = 0
       fi;
       ar = 0
     }
#ifdef BUG_RELEASE_UNPROTECTED
  /* broken: an owner releases a sealed step before it is protected */
  :: atomic {
       (up[0] && sst[0] == SEALED) || (up[0] && sst[1] == SEALED) || (up[1] && sst[2] == SEALED) || (up[1] && sst[3] == SEALED) ->
       if
       :: up[0] && sst[0] == SEALED -> ai = 0
       :: up[0] && sst[1] == SEALED -> ai = 1
       :: up[1] && sst[2] == SEALED -> ai = 2
       :: up[1] && sst[3] == SEALED -> ai = 3
       fi;
       printf("TRACE BUG an owner releases a sealed, unprotected step %d\n", vs[VI(ai/2, slv[ai])]);
       slv[ai] = 0; sst[ai] = 0; spk[ai] = 0; rsent[ai] = 0;
       ai = 0
     }
#endif
  /* the operator drops the job (tessera drop): its trainers are stopped first (a drop is refused
     while one runs); the coordinator records the drop as a new epoch and every live daemon takes
     it (ApplyDrop), or misses it (a message fault); it is taken once a majority (2 of 3) has it */
  :: atomic {
       ndrop < MAXDROP && !stopped && COORD != NOCOORD && preq[COORD] == 0 ->
       ndrop++;
       xc = COORD;
       if :: ts[0] != TDEAD -> ts[0] = TSTOP :: else fi;
       if :: ts[1] != TDEAD -> ts[1] = TSTOP :: else fi;
       new_epoch(xc);
       gdec = ep[xc];
       printf("TRACE the operator drops the job: coordinator %d, epoch %d\n", xc, ep[xc]);
       apply_drop(xc, ep[xc], ep[xc]);
       xu0 = 1;                     /* daemons that took it */
       xn = 0;
       do
       :: xn < NN ->
          if
          :: xn != xc && up[xn] ->
             if
             :: true -> apply_drop(xn, ep[xc], ep[xc]); xu0++
             :: MF(2) -> nmsgf++; printf("TRACE FAULT daemon %d misses the drop\n", xn)
             fi
          :: else
          fi;
          xn++
       :: else -> break
       od;
       xn = 0;
       if :: xu0 * 2 > NN -> gdrop = ep[xc] :: else -> printf("TRACE the drop is not taken by a majority (the operator asks again)\n") fi;
       xu0 = 0; xc = 0
     }
  /* ---------------- faults ---------------- */
  /* a daemon crashes: its soft state is gone (a down daemon does nothing, so it is cleared now) */
  :: atomic {
       ncrash < MAXCRASH && !stopped && ((up[0] && (CRASHMASK & 1)) || (up[1] && (CRASHMASK & 2)) || (up[2] && (CRASHMASK & 4))) ->
       if
       :: up[0] && (CRASHMASK & 1) -> an = 0
       :: up[1] && (CRASHMASK & 2) -> an = 1
       :: up[2] && (CRASHMASK & 4) -> an = 2
       fi;
       up[an] = 0; ncrash++;
       printf("TRACE FAULT daemon %d crashes (it knew epoch %d)\n", an, ep[an]);
       xe = ep[an]; xci = cr[an];
       adopt_epoch(an, 0); cr[an] = 0; dr[an] = 0;   /* the drop is soft state */
       /* FIX_DURABLE_STATE: the daemon stored the JobState it learned (epoch, commit record) next
          to its slots: it survives the restart */
       if :: FIX_DURABLE_STATE -> ep[an] = xe; cr[an] = xci :: else fi;
       if
       :: an < NR ->
          /* the epoch it knows after the restart is what its slot headers carry */
          if :: SV(an,0) != 0 && ve[VI(an,SV(an,0))] > ep[an] -> ep[an] = ve[VI(an,SV(an,0))] :: else fi;
          if :: SV(an,1) != 0 && ve[VI(an,SV(an,1))] > ep[an] -> ep[an] = ve[VI(an,SV(an,1))] :: else fi;
          if :: SV(an,0) != 0 -> sst[SI(an,0)] = SEALED :: else fi;
          if :: SV(an,1) != 0 -> sst[SI(an,1)] = SEALED :: else fi;
          spk[SI(an,0)] = 0; spk[SI(an,1)] = 0
       :: else
       fi;
       fresh[an] = 1; preq[an] = 0; pmask[an] = 0; prun[an] = 0;
       xe = 0; xci = 0; an = 0;
       takeover();
       resend_all()
     }
  /* it restarts as a new incarnation */
  :: atomic {
       (!up[0] && !lost[0]) || (!up[1] && !lost[1]) || (!up[2] && !lost[2]) ->
       if
       :: !up[0] && !lost[0] -> an = 0
       :: !up[1] && !lost[1] -> an = 1
       :: !up[2] && !lost[2] -> an = 2
       fi;
       up[an] = 1; inc[an]++;
       /* its reports still in flight come from an older incarnation now: refused on arrival */
       if :: an < NR -> FENCE_REPORTS(an) :: else fi;
       printf("TRACE daemon %d restarts, knows epoch %d\n", an, ep[an]);
       an = 0;
       takeover();
       resend_all()
     }
  /* a node is lost with its memory */
  :: atomic {
       nloss < MAXLOSS && !stopped && ((!lost[0] && (LOSSMASK & 1)) || (!lost[1] && (LOSSMASK & 2)) || (!lost[2] && (LOSSMASK & 4))) ->
       if
       :: !lost[0] && (LOSSMASK & 1) -> an = 0
       :: !lost[1] && (LOSSMASK & 2) -> an = 1
       :: !lost[2] && (LOSSMASK & 4) -> an = 2
       fi;
       lost[an] = 1; up[an] = 0; nloss++;
       printf("TRACE FAULT node %d is lost\n", an);
       if
       :: an < NR ->
          SV(an,0) = 0; SV(an,1) = 0; sst[SI(an,0)] = 0; sst[SI(an,1)] = 0;
          spk[SI(an,0)] = 0; spk[SI(an,1)] = 0; rset[an] = 0; ts[an] = TDEAD
       :: else
       fi;
       fr[FI(an,0)] = 0; fr[FI(an,1)] = 0;
       adopt_epoch(an, 0); cr[an] = 0; dr[an] = 0; fresh[an] = 0; preq[an] = 0; pmask[an] = 0; prun[an] = 0;
       xn = 0;
       do
       :: xn < NN -> jv[JI(an,xn)] = 0; jep[JI(an,xn)] = 0; jci[JI(an,xn)] = 0; jdd[JI(an,xn)] = 0; jsi[JI(an,xn)] = 0; jdr[JI(an,xn)] = 0; xn++
       :: else -> break
       od;
       xn = 0; an = 0;
       takeover();
       resend_all()
     }
  /* the job is restarted: every trainer resumes */
  :: atomic {
       nrun < MAXRUN && !stopped ->
       nrun++;
       printf("TRACE FAULT the job restarts (trainer run %d)\n", nrun);
       if :: ts[0] != TDEAD -> ts[0] = RESUMING :: else fi;
       if :: ts[1] != TDEAD -> ts[1] = RESUMING :: else fi;
       rqsent[0] = 0; rqsent[1] = 0;
       runset = 0; runrp = 0
     }
  /* a message in flight is lost */
  :: atomic {
       LOSSF && (rset[0] != 0 || rset[1] != 0 || jv[1] || jv[2] || jv[3] || jv[5] || jv[6] || jv[7] ||
                     rq[0] || rq[1] || ra[0] || ra[1]) ->
       if
       :: rset[0] != 0 -> rset[0] = 0
       :: rset[1] != 0 -> rset[1] = 0
       :: jv[1] -> an = 1
       :: jv[2] -> an = 2
       :: jv[3] -> an = 3
       :: jv[5] -> an = 5
       :: jv[6] -> an = 6
       :: jv[7] -> an = 7
       :: rq[0] -> rq[0] = 0; rqc[0] = 0; rqi[0] = 0; rqn[0] = 0
       :: rq[1] -> rq[1] = 0; rqc[1] = 0; rqi[1] = 0; rqn[1] = 0
       :: ra[0] -> ra[0] = 0; rae[0] = 0; rap[0] = 0; ras[0] = 0; rar[0] = 0
       :: ra[1] -> ra[1] = 0; rae[1] = 0; rap[1] = 0; ras[1] = 0; rar[1] = 0
       fi;
       if :: an != 0 -> jv[an] = 0; jep[an] = 0; jci[an] = 0; jdd[an] = 0; jsi[an] = 0; jdr[an] = 0 :: else fi;
       an = 0;
       nmsgf++;
       printf("TRACE FAULT a message in flight is lost\n");
       resend_all()
     }
#ifdef LIVENESS
  /* from here on, no more faults */
  :: atomic { !stopped -> stopped = 1 }
#endif
  od
}

#ifndef LIVENESS
active proctype inv1() {
end:
  atomic { !INV1 -> printf("VIOLATION committed_restorable: the newest commit a live daemon knows is not restorable\n"); assert(false) }
}
#endif

#ifdef LIVENESS
ltl live { [] (stopped -> <> DONE) }
#endif
