use super::fit::fit_pod;
use super::ledger::{Ledger, Placement};
use super::policy::{GpuPolicy, Policy};
use super::reason::FitReason;
use super::request::{CardFilter, ContainerRequest, DefaultMemory, MemRequest, PodRequest};
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use vgpu_contract::annotations::PodDevices;
use vgpu_contract::register::DeviceInfo;

fn card(id: &str, index: u32, slots: u32, mem: u64, kind: &str) -> DeviceInfo {
    DeviceInfo {
        id: id.into(),
        index,
        count: slots,
        devmem: mem,
        devcore: 100,
        kind: kind.into(),
        health: true,
        ..Default::default()
    }
}

fn t4() -> Vec<DeviceInfo> {
    vec![card(
        "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039",
        0,
        10,
        15360,
        "NVIDIA-Tesla T4",
    )]
}

fn one(gpus: u32, mem: MemRequest, cores: u32) -> PodRequest {
    PodRequest {
        containers: vec![ContainerRequest { gpus, mem, cores }],
        ..Default::default()
    }
}

fn place(l: &mut Ledger, uid: &str, nodes: &[&str], req: &PodRequest) -> Decision {
    l.place(
        uid,
        &format!("default/{uid}"),
        nodes,
        req,
        &Config::default(),
    )
}

fn chosen_node<'a>(d: &Decision, nodes: &[&'a str]) -> Option<&'a str> {
    d.chosen.as_ref().map(|(i, _, _)| nodes[*i])
}

#[test]
fn lab_scenario_third_fits_with_8000_reserved_and_eleventh_is_refused() {
    let mut l = Ledger::default();
    l.upsert_node("hami-workshop", t4());
    let nodes = ["hami-workshop"];
    let slice = one(1, MemRequest::MiB(4000), 0);
    for uid in ["gpumem-pod-a", "gpumem-pod-b"] {
        assert!(place(&mut l, uid, &nodes, &slice).chosen.is_some());
    }
    let a = l.placement("gpumem-pod-a").unwrap().devices.encode();
    assert_eq!(
        a,
        "GPU-859b872c-0ba2-97b0-10b4-8b7185c55039,NVIDIA,4000,0:;"
    );
    assert_eq!(l.placement("gpumem-pod-b").unwrap().devices.encode(), a);
    assert_eq!(l.node("hami-workshop").unwrap().usage[0].mem_mib, 8000);

    let third = place(&mut l, "oom-test-pod", &nodes, &slice);
    let (_, _, score) = third
        .chosen
        .expect("a third 4000 MiB slice fits in 15360 with 8000 reserved");
    assert_eq!(format!("{score:.2}"), "7.21");

    // A fourth 4000 MiB slice would need 16000 MiB.
    let fourth = place(&mut l, "too-big", &nodes, &slice);
    assert!(fourth.chosen.is_none());
    assert_eq!(fourth.misses[0].1.to_string(), "1/1 CardInsufficientMemory");

    // Fill the remaining seven slots with small slices; the eleventh pod finds no slot.
    for i in 4..=10 {
        assert!(
            place(
                &mut l,
                &format!("small-{i}"),
                &nodes,
                &one(1, MemRequest::MiB(400), 0)
            )
            .chosen
            .is_some(),
            "pod {i}"
        );
    }
    let eleventh = place(&mut l, "small-11", &nodes, &one(1, MemRequest::MiB(1), 0));
    assert!(eleventh.chosen.is_none());
    assert_eq!(
        eleventh.misses[0].1.to_string(),
        "1/1 CardTimeSlicingExhausted"
    );
    assert_eq!(l.node("hami-workshop").unwrap().usage[0].slots, 10);
}

#[test]
fn reasons_come_in_hami_order() {
    let mut sick = card("GPU-s", 0, 1, 100, "NVIDIA-Tesla T4");
    sick.health = false;
    let node = NodeState::new("n", &[sick]);
    // Unhealthy and too small: unhealthy is checked first.
    let miss = fit_pod(
        &node,
        &one(1, MemRequest::MiB(1000), 0),
        DefaultMemory::default(),
        Policy::Spread,
    )
    .unwrap_err();
    assert_eq!(miss.to_string(), "1/1 CardNotHealth");

    let node = NodeState::new("n", &[card("GPU-a", 0, 1, 100, "NVIDIA-Tesla T4")]);
    let mut req = one(1, MemRequest::MiB(1000), 0);
    req.filter.use_types = vec!["a100".into()];
    req.filter.use_uuids = vec!["GPU-z".into()];
    let r = |req: &PodRequest| {
        fit_pod(&node, req, DefaultMemory::default(), Policy::Spread)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(r(&req), "1/1 CardTypeMismatch");
    req.filter.use_types.clear();
    assert_eq!(r(&req), "1/1 CardUuidMismatch");
    req.filter.use_uuids.clear();
    assert_eq!(r(&req), "1/1 CardInsufficientMemory");
}

#[test]
fn every_card_reason_is_reachable() {
    let mut node = NodeState::new("n", &[card("GPU-a", 0, 2, 1000, "NVIDIA-Tesla T4")]);
    let r = |node: &NodeState, req: PodRequest| {
        fit_pod(node, &req, DefaultMemory::default(), Policy::Spread)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    node.usage[0].add(100, 80);
    assert_eq!(
        r(&node, one(1, MemRequest::MiB(100), 30)),
        "1/1 CardInsufficientCore"
    );
    // One slot and 20 cores are still free, so a 0-core request fits.
    assert!(fit_pod(
        &node,
        &one(1, MemRequest::MiB(100), 0),
        DefaultMemory::default(),
        Policy::Spread
    )
    .is_ok());
    node.usage[0].add(100, 0);
    assert_eq!(
        r(&node, one(1, MemRequest::MiB(100), 0)),
        "1/1 CardTimeSlicingExhausted"
    );
    let mut full = NodeState::new("n", &[card("GPU-a", 0, 3, 1000, "NVIDIA-Tesla T4")]);
    full.usage[0].add(100, 100);
    assert_eq!(
        r(&full, one(1, MemRequest::MiB(100), 0)),
        "1/1 CardComputeUnitsExhausted"
    );
    let mut busy = NodeState::new("n", &[card("GPU-a", 0, 3, 1000, "NVIDIA-Tesla T4")]);
    busy.usage[0].add(100, 0);
    assert_eq!(
        r(&busy, one(1, MemRequest::MiB(100), 100)),
        "1/1 ExclusiveDeviceAllocateConflict"
    );
    let mut req = one(1, MemRequest::MiB(1), 0);
    req.filter.nouse_uuids = vec!["GPU-a".into()];
    assert_eq!(
        r(
            &NodeState::new("n", &[card("GPU-a", 0, 3, 1000, "NVIDIA-Tesla T4")]),
            req
        ),
        "1/1 CardUuidMismatch"
    );
}

#[test]
fn a_container_gets_distinct_cards_or_node_insufficient_device() {
    let devs = [
        card("GPU-a", 0, 10, 16000, "NVIDIA-Tesla T4"),
        card("GPU-b", 1, 10, 16000, "NVIDIA-Tesla T4"),
    ];
    let node = NodeState::new("n", &devs);
    let fit = fit_pod(
        &node,
        &one(2, MemRequest::MiB(4000), 30),
        DefaultMemory::default(),
        Policy::Spread,
    )
    .unwrap();
    // HAMi walks its sorted list from the end: among equal cards the higher index comes first.
    assert_eq!(
        fit.devices(&node).encode(),
        "GPU-b,NVIDIA,4000,30:GPU-a,NVIDIA,4000,30:;"
    );
    let miss = fit_pod(
        &node,
        &one(3, MemRequest::MiB(1), 0),
        DefaultMemory::default(),
        Policy::Spread,
    )
    .unwrap_err();
    assert_eq!(miss.to_string(), "NodeInsufficientDevice");
    // Two cards exist but one is too full: the card reason is reported with its count, and (as
    // HAMi does) how many cards did fit.
    let mut half = node.clone();
    half.usage[1].add(15000, 0);
    let miss = fit_pod(
        &half,
        &one(2, MemRequest::MiB(4000), 0),
        DefaultMemory::default(),
        Policy::Spread,
    )
    .unwrap_err();
    assert_eq!(
        miss.to_string(),
        "1/2 AllocatedCardsInsufficientRequest, 1/2 CardInsufficientMemory"
    );
}

#[test]
fn containers_without_gpus_keep_their_place_and_later_containers_see_earlier_ones() {
    let node = NodeState::new("n", &[card("GPU-a", 0, 2, 10000, "NVIDIA-Tesla T4")]);
    let req = PodRequest {
        containers: vec![
            ContainerRequest::NONE,
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(6000),
                cores: 0,
            },
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(6000),
                cores: 0,
            },
        ],
        ..Default::default()
    };
    // 12000 MiB on a 10000 MiB card: the second container must see the first's share.
    assert_eq!(
        fit_pod(&node, &req, DefaultMemory::default(), Policy::Spread)
            .unwrap_err()
            .to_string(),
        "1/1 CardInsufficientMemory"
    );
    let mut ok = req.clone();
    ok.containers[2].mem = MemRequest::MiB(4000);
    let fit = fit_pod(&node, &ok, DefaultMemory::default(), Policy::Spread).unwrap();
    assert_eq!(
        fit.devices(&node).encode(),
        ";GPU-a,NVIDIA,6000,0:;GPU-a,NVIDIA,4000,0:;"
    );
}

#[test]
fn default_memory_is_the_whole_card_unless_configured() {
    let mut l = Ledger::default();
    l.upsert_node("n", vec![card("GPU-a", 0, 10, 15360, "NVIDIA-Tesla T4")]);
    let d = place(&mut l, "p1", &["n"], &one(1, MemRequest::Default, 0));
    assert_eq!(d.chosen.unwrap().1.picks[0][0].mem_mib, 15360);
    let d = place(&mut l, "p2", &["n"], &one(1, MemRequest::Default, 0));
    assert_eq!(d.misses[0].1.to_string(), "1/1 CardInsufficientMemory");
    let cfg = Config {
        default_memory: DefaultMemory::MiB(1024),
        ..Config::default()
    };
    let mut l = Ledger::default();
    l.upsert_node("n", vec![card("GPU-a", 0, 10, 15360, "NVIDIA-Tesla T4")]);
    let d = l.place(
        "p1",
        "default/p1",
        &["n"],
        &one(1, MemRequest::Default, 0),
        &cfg,
    );
    assert_eq!(d.chosen.unwrap().1.picks[0][0].mem_mib, 1024);
    let d = place(&mut l, "p3", &["n"], &one(1, MemRequest::Percent(50), 0));
    assert_eq!(d.chosen.unwrap().1.picks[0][0].mem_mib, 7680);
}

/// Two nodes, one already half full: binpack names the fuller one, spread the emptier.
#[test]
fn node_policy_picks_the_node_it_names() {
    let mut l = Ledger::default();
    for n in ["empty", "busy"] {
        l.upsert_node(
            n,
            vec![card(&format!("GPU-{n}"), 0, 10, 16000, "NVIDIA-Tesla T4")],
        );
    }
    let nodes = ["empty", "busy"];
    let mut seed = one(1, MemRequest::MiB(8000), 0);
    seed.node_policy = Some(Policy::Binpack);
    l.record(
        "seed",
        Placement::as_asked(
            "default/seed",
            "busy",
            PodDevices::decode("GPU-busy,NVIDIA,8000,0:;").unwrap(),
        ),
    );
    let mut req = one(1, MemRequest::MiB(1000), 0);
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &Config::default()), &nodes),
        Some("busy"),
        "binpack is the node default"
    );
    req.node_policy = Some(Policy::Spread);
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &Config::default()), &nodes),
        Some("empty")
    );
    let spread_cfg = Config {
        node_policy: Policy::Spread,
        ..Config::default()
    };
    req.node_policy = None;
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &spread_cfg), &nodes),
        Some("empty")
    );
    req.node_policy = Some(Policy::Binpack);
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &spread_cfg), &nodes),
        Some("busy"),
        "the pod's annotation overrides the default"
    );
}

/// Four cards, card 2 partly used: binpack puts the pod on card 2, spread on card 3 (HAMi takes
/// the highest index among the equally idle ones).
#[test]
fn gpu_policy_picks_the_card_it_names() {
    let devs: Vec<DeviceInfo> = (0..4)
        .map(|i| card(&format!("GPU-{i}"), i, 10, 16000, "NVIDIA A100"))
        .collect();
    let mut l = Ledger::default();
    l.upsert_node("n", devs);
    l.record(
        "seed",
        Placement::as_asked(
            "default/seed",
            "n",
            PodDevices::decode("GPU-2,NVIDIA,2000,10:;").unwrap(),
        ),
    );
    let mut req = one(1, MemRequest::MiB(1000), 0);
    let uuid = |l: &Ledger, req: &PodRequest, cfg: &Config| {
        let d = l.decide(&["n"], req, cfg);
        d.chosen.unwrap().1.devices(l.node("n").unwrap()).0[0][0]
            .uuid
            .clone()
    };
    assert_eq!(
        uuid(&l, &req, &Config::default()),
        "GPU-3",
        "spread is the card default"
    );
    req.gpu_policy = Some(GpuPolicy::BINPACK);
    assert_eq!(uuid(&l, &req, &Config::default()), "GPU-2");
    let binpack_cfg = Config {
        gpu_policy: GpuPolicy::BINPACK,
        ..Config::default()
    };
    req.gpu_policy = None;
    assert_eq!(uuid(&l, &req, &binpack_cfg), "GPU-2");
    req.gpu_policy = Some(GpuPolicy::SPREAD);
    assert_eq!(uuid(&l, &req, &binpack_cfg), "GPU-3");
}

#[test]
fn type_and_uuid_filters_steer_and_unhealthy_cards_are_skipped() {
    let mut sick = card("GPU-sick", 0, 10, 80000, "NVIDIA H100 80GB HBM3");
    sick.health = false;
    let devs = vec![
        sick,
        card("GPU-t4", 1, 10, 15360, "NVIDIA-Tesla T4"),
        card("GPU-h100", 2, 10, 80000, "NVIDIA H100 80GB HBM3"),
    ];
    let node = NodeState::new("n", &devs);
    let pick = |req: &PodRequest| {
        fit_pod(&node, req, DefaultMemory::default(), Policy::Spread)
            .map(|f| f.devices(&node).0[0][0].uuid.clone())
    };
    let mut req = one(1, MemRequest::MiB(1000), 0);
    req.filter.use_types = CardFilter::list("H100", true);
    assert_eq!(pick(&req).unwrap(), "GPU-h100");
    req.filter = CardFilter {
        nouse_types: CardFilter::list("h100", true),
        ..Default::default()
    };
    assert_eq!(pick(&req).unwrap(), "GPU-t4");
    req.filter = CardFilter {
        use_uuids: vec!["GPU-sick".into()],
        ..Default::default()
    };
    assert_eq!(
        pick(&req).unwrap_err().to_string(),
        "1/3 CardNotHealth, 2/3 CardUuidMismatch"
    );
    req.filter = CardFilter {
        nouse_uuids: vec!["GPU-t4".into(), "GPU-h100".into()],
        ..Default::default()
    };
    assert!(pick(&req).is_err());
}

#[test]
fn unknown_nodes_miss_as_unregistered() {
    let l = Ledger::default();
    let d = l.decide(
        &["ghost"],
        &one(1, MemRequest::MiB(1), 0),
        &Config::default(),
    );
    assert_eq!(
        d.misses[0].1.reasons().collect::<Vec<_>>(),
        vec![FitReason::NodeUnregistered]
    );
}

#[test]
fn reregistering_a_node_keeps_its_reservations() {
    let mut l = Ledger::default();
    l.upsert_node("n", t4());
    place(&mut l, "p", &["n"], &one(1, MemRequest::MiB(4000), 20));
    let mut devs = t4();
    devs[0].health = false;
    l.upsert_node("n", devs);
    assert_eq!(l.node("n").unwrap().usage[0].mem_mib, 4000);
    l.remove_node("n");
    l.upsert_node("n", t4());
    assert_eq!(l.node("n").unwrap().usage[0].cores, 20);
    assert!(l.release("p").is_some());
    assert_eq!(l.node("n").unwrap().usage[0], Default::default());
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Op {
    Place(PodRequest),
    Release(usize),
}

fn arb_container() -> impl Strategy<Value = ContainerRequest> {
    let mem = prop_oneof![
        (1u64..20000).prop_map(MemRequest::MiB),
        (1u32..=100).prop_map(MemRequest::Percent),
        Just(MemRequest::Default),
    ];
    (
        0u32..4,
        mem,
        prop_oneof![Just(0u32), 1u32..=100, Just(100u32)],
    )
        .prop_map(|(gpus, mem, cores)| ContainerRequest { gpus, mem, cores })
}

fn arb_pod() -> impl Strategy<Value = PodRequest> {
    (
        prop::collection::vec(arb_container(), 1..4),
        prop::option::of(prop_oneof![Just(Policy::Binpack), Just(Policy::Spread)]),
        prop::option::of(prop_oneof![
            Just(GpuPolicy::BINPACK),
            Just(GpuPolicy::SPREAD),
            Just("mutex".parse().unwrap()),
            Just("binpack,numa".parse().unwrap()),
        ]),
        0usize..3,
    )
        .prop_map(|(containers, node_policy, gpu_policy, init)| PodRequest {
            init: init.min(containers.len()),
            containers,
            filter: Default::default(),
            node_policy,
            gpu_policy,
        })
        .prop_flat_map(|req| (Just(req), arb_filter()))
        .prop_map(|(mut req, filter)| {
            req.filter = filter;
            req
        })
}

/// Mostly no filter, sometimes type or UUID lists over the names the clusters use.
fn arb_filter() -> impl Strategy<Value = CardFilter> {
    let words = |pool: &'static [&'static str]| {
        prop::sample::subsequence(pool, 0..=pool.len())
            .prop_map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
    };
    prop_oneof![
        3 => Just(CardFilter::default()),
        1 => (words(&["t4", "a100"]), words(&["t4", "a100"]), words(&["GPU-0", "GPU-1"]), words(&["GPU-0", "GPU-1"])).prop_map(
            |(use_types, nouse_types, use_uuids, nouse_uuids)| CardFilter { use_types, nouse_types, use_uuids, nouse_uuids, ..Default::default() }
        ),
    ]
}

fn arb_card(i: u32) -> impl Strategy<Value = DeviceInfo> {
    (
        1u32..12,
        1000u64..50000,
        prop_oneof![Just(100u32), Just(200u32)],
        prop::bool::weighted(0.9),
        prop_oneof![Just("NVIDIA-Tesla T4"), Just("NVIDIA A100-SXM4-80GB")],
    )
        .prop_map(move |(count, devmem, devcore, health, kind)| DeviceInfo {
            id: format!("GPU-{i}"),
            index: i,
            count,
            devmem,
            devcore,
            kind: kind.into(),
            health,
            ..Default::default()
        })
}

fn arb_cluster() -> impl Strategy<Value = Vec<Vec<DeviceInfo>>> {
    prop::collection::vec(
        (1usize..5).prop_flat_map(|n| (0..n as u32).map(arb_card).collect::<Vec<_>>()),
        1..4,
    )
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![4 => arb_pod().prop_map(Op::Place), 1 => (0usize..64).prop_map(Op::Release)],
        1..60,
    )
}

/// What every recorded placement books per card, straight from the placements and independently
/// of the ledger's running usage: per pod and card, the larger of any one init container and the
/// app containers' sum, field by field.
fn sums(l: &Ledger) -> HashMap<(String, String), (u32, u64, u32)> {
    let mut out: HashMap<(String, String), (u32, u64, u32)> = HashMap::new();
    for (_, p) in l.placements() {
        let mut init: HashMap<String, (u32, u64, u32)> = HashMap::new();
        let mut app: HashMap<String, (u32, u64, u32)> = HashMap::new();
        for (ci, c) in p.devices.0.iter().enumerate() {
            let mut seen = std::collections::HashSet::new();
            for d in c {
                assert!(
                    seen.insert(d.uuid.clone()),
                    "a container got card {} twice",
                    d.uuid
                );
                if ci < p.init {
                    let e = init.entry(d.uuid.clone()).or_default();
                    *e = (e.0.max(1), e.1.max(d.mem_mib), e.2.max(d.cores));
                } else {
                    let e = app.entry(d.uuid.clone()).or_default();
                    *e = (e.0 + 1, e.1 + d.mem_mib, e.2 + d.cores);
                }
            }
        }
        for (uuid, i) in init {
            let a = app.entry(uuid).or_default();
            *a = (a.0.max(i.0), a.1.max(i.1), a.2.max(i.2));
        }
        for (uuid, a) in app {
            let e = out.entry((p.node.clone(), uuid)).or_default();
            *e = (e.0 + a.0, e.1 + a.1, e.2 + a.2);
        }
    }
    out
}

fn check_invariants(l: &Ledger) {
    let sums = sums(l);
    for node in l.nodes() {
        for (c, u) in node.cards.iter().zip(&node.usage) {
            let (slots, mem, cores) = sums
                .get(&(node.name.clone(), c.uuid.clone()))
                .copied()
                .unwrap_or_default();
            assert_eq!(
                (u.slots, u.mem_mib, u.cores),
                (slots, mem, cores),
                "running usage drifted from the placements on {}",
                c.uuid
            );
            assert!(
                slots <= c.slots,
                "{} over-committed in slots: {slots} > {}",
                c.uuid,
                c.slots
            );
            assert!(
                mem <= c.mem_mib,
                "{} over-committed in memory: {mem} > {}",
                c.uuid,
                c.mem_mib
            );
            assert!(
                cores <= c.cores,
                "{} over-committed in cores: {cores} > {}",
                c.uuid,
                c.cores
            );
            if slots > 0 {
                assert!(c.healthy, "placed on unhealthy card {}", c.uuid);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_card_is_ever_over_committed(cluster in arb_cluster(), ops in arb_ops(), spread_default in any::<bool>()) {
        let mut l = Ledger::default();
        let names: Vec<String> = (0..cluster.len()).map(|i| format!("node-{i}")).collect();
        for (n, devs) in names.iter().zip(&cluster) {
            l.upsert_node(n, devs.clone());
        }
        let cfg = Config { node_policy: if spread_default { Policy::Spread } else { Policy::Binpack }, ..Config::default() };
        let mut live: Vec<String> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Place(req) => {
                    let uid = format!("pod-{step}");
                    let d = l.place(&uid, &uid, &names, &req, &cfg);
                    if let Some((i, fit, _)) = &d.chosen {
                        live.push(uid.clone());
                        let p = l.placement(&uid).unwrap();
                        prop_assert_eq!(&p.node, &names[*i]);
                        prop_assert_eq!(p.devices.0.len(), req.containers.len());
                        for (c, r) in fit.picks.iter().zip(&req.containers) {
                            prop_assert_eq!(c.len(), r.gpus as usize);
                        }
                        // Every chosen card is one the pod's filters allow.
                        let node = l.node(&names[*i]).unwrap();
                        for d in p.devices.devices() {
                            let card = &node.cards[node.card_by_uuid(&d.uuid).unwrap()];
                            prop_assert!(req.filter.type_ok(&card.kind_lower), "{} is not an allowed type", card.kind);
                            prop_assert!(req.filter.uuid_ok(&card.uuid), "{} is not an allowed card", card.uuid);
                        }
                    } else {
                        prop_assert!(l.placement(&uid).is_none());
                        prop_assert_eq!(d.misses.len(), names.len());
                    }
                }
                Op::Release(k) if !live.is_empty() => {
                    let uid = live.remove(k % live.len());
                    prop_assert!(l.release(&uid).is_some());
                }
                Op::Release(_) => {}
            }
            check_invariants(&l);
        }
        // A restart: a new ledger fed the same registrations and placements, in another order,
        // holds the same usage.
        let mut rebuilt = Ledger::default();
        let mut placements: Vec<(String, Placement)> = l.placements().map(|(u, p)| (u.clone(), p.clone())).collect();
        placements.reverse();
        for (u, p) in placements {
            rebuilt.record(&u, p);
        }
        for (n, devs) in names.iter().zip(&cluster) {
            rebuilt.upsert_node(n, devs.clone());
        }
        for n in &names {
            prop_assert_eq!(&l.node(n).unwrap().usage, &rebuilt.node(n).unwrap().usage);
        }
    }

    /// The per-node summary filter reads first answers exactly as the full check does, reasons
    /// included, and keeps the node's score, whatever was placed and released before.
    #[test]
    fn the_node_summary_agrees_with_the_full_check(cluster in arb_cluster(), pods in prop::collection::vec(arb_pod(), 1..20), probes in prop::collection::vec(arb_pod(), 1..8)) {
        let names: Vec<String> = (0..cluster.len()).map(|i| format!("node-{i}")).collect();
        let mut l = Ledger::default();
        for (n, devs) in names.iter().zip(&cluster) {
            l.upsert_node(n, devs.clone());
        }
        for (i, p) in pods.iter().enumerate() {
            l.place(&format!("p{i}"), "p", &names, p, &Config::default());
            if i % 3 == 0 {
                l.release(&format!("p{}", i / 2));
            }
        }
        for node in l.nodes() {
            prop_assert_eq!(node.hot.score, score::node_score(node));
            for probe in &probes {
                for default_mem in [DefaultMemory::default(), DefaultMemory::MiB(3000)] {
                    let policy = probe.gpu_policy.unwrap_or(GpuPolicy::SPREAD);
                    // Judge the types first, as choose's full checks do on earlier nodes.
                    let full = fit::check_pod(node, probe, default_mem, policy);
                    if let Some(quick) = node.hot.check(probe, default_mem, policy.mutex) {
                        prop_assert_eq!(quick, full);
                    }
                }
            }
        }
    }

    /// Whatever the order the same pods arrive in, each one either fits or names a reason, and no
    /// card is over-committed.
    #[test]
    fn order_does_not_matter_for_safety(cluster in arb_cluster(), pods in prop::collection::vec(arb_pod(), 1..20), seed in any::<u64>()) {
        let names: Vec<String> = (0..cluster.len()).map(|i| format!("node-{i}")).collect();
        let mut order: Vec<usize> = (0..pods.len()).collect();
        // A cheap deterministic shuffle driven by the seed.
        let mut s = seed | 1;
        for i in (1..order.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut l = Ledger::default();
        for (n, devs) in names.iter().zip(&cluster) {
            l.upsert_node(n, devs.clone());
        }
        for i in order {
            let d = l.place(&format!("p{i}"), "p", &names, &pods[i], &Config::default());
            prop_assert!(d.chosen.is_some() || !d.misses.is_empty());
            check_invariants(&l);
        }
    }
}

// ---- HAMi v2.10 parity (issue 17), each case as HAMi behaves ----

fn ledger_with(devs: Vec<DeviceInfo>) -> Ledger {
    let mut l = Ledger::default();
    l.upsert_node("n", devs);
    l
}

fn devices_on(l: &Ledger, req: &PodRequest) -> Result<String, String> {
    let d = l.decide(&["n"], req, &Config::default());
    match d.chosen {
        Some((_, fit, _)) => Ok(fit.devices(l.node("n").unwrap()).encode()),
        None => Err(d.misses[0].1.to_string()),
    }
}

#[test]
fn hami_takes_the_highest_index_among_equal_cards() {
    let l = ledger_with(vec![
        card("uuid1", 0, 10, 16000, "NVIDIA A100"),
        card("uuid2", 1, 10, 16000, "NVIDIA A100"),
    ]);
    assert_eq!(
        devices_on(&l, &one(1, MemRequest::MiB(1000), 0)).unwrap(),
        "uuid2,NVIDIA,1000,0:;"
    );
    assert_eq!(
        devices_on(&l, &one(2, MemRequest::MiB(1000), 0)).unwrap(),
        "uuid2,NVIDIA,1000,0:uuid1,NVIDIA,1000,0:;"
    );
    let mut binpack = one(1, MemRequest::MiB(1000), 0);
    binpack.gpu_policy = Some(GpuPolicy::BINPACK);
    assert_eq!(devices_on(&l, &binpack).unwrap(), "uuid2,NVIDIA,1000,0:;");
}

/// HAMi's one-word order breaks score ties by NUMA node, higher first.
#[test]
fn equal_scores_go_to_the_higher_numa_node() {
    let mut a = card("GPU-n1", 0, 10, 16000, "NVIDIA A100");
    a.numa = 1;
    let b = card("GPU-n0", 1, 10, 16000, "NVIDIA A100");
    let l = ledger_with(vec![a, b]);
    assert_eq!(
        devices_on(&l, &one(1, MemRequest::MiB(1000), 0)).unwrap(),
        "GPU-n1,NVIDIA,1000,0:;"
    );
}

/// `numa,binpack` sorts by NUMA first (higher first), then binpack within it; `binpack,numa` the
/// other way round.
#[test]
fn policy_chains_sort_by_their_keys_in_order() {
    let mut busy0 = card("GPU-busy-numa0", 0, 10, 16000, "NVIDIA A100");
    busy0.numa = 0;
    let mut idle1 = card("GPU-idle-numa1", 1, 10, 16000, "NVIDIA A100");
    idle1.numa = 1;
    let mut l = ledger_with(vec![busy0, idle1]);
    l.record(
        "seed",
        Placement::as_asked(
            "default/seed",
            "n",
            PodDevices::decode("GPU-busy-numa0,NVIDIA,4000,0:;").unwrap(),
        ),
    );
    let with = |p: &str| {
        let mut r = one(1, MemRequest::MiB(1000), 0);
        r.gpu_policy = Some(p.parse().unwrap());
        devices_on(&l, &r).unwrap()
    };
    assert_eq!(with("binpack,numa"), "GPU-busy-numa0,NVIDIA,1000,0:;");
    assert_eq!(with("numa,binpack"), "GPU-idle-numa1,NVIDIA,1000,0:;");
    assert_eq!(with("spread,numa"), "GPU-idle-numa1,NVIDIA,1000,0:;");
}

#[test]
fn mutex_takes_only_cards_nobody_uses() {
    let mut l = ledger_with(vec![
        card("GPU-0", 0, 10, 16000, "NVIDIA A100"),
        card("GPU-1", 1, 10, 16000, "NVIDIA A100"),
    ]);
    l.record(
        "seed",
        Placement::as_asked(
            "default/seed",
            "n",
            PodDevices::decode("GPU-1,NVIDIA,1000,0:;").unwrap(),
        ),
    );
    let mut req = one(1, MemRequest::MiB(1000), 0);
    req.gpu_policy = Some("mutex".parse().unwrap());
    assert_eq!(devices_on(&l, &req).unwrap(), "GPU-0,NVIDIA,1000,0:;");
    req.containers[0].gpus = 2;
    assert_eq!(
        devices_on(&l, &req).unwrap_err(),
        "1/2 AllocatedCardsInsufficientRequest, 1/2 ExclusiveDeviceAllocateConflict"
    );
    // In a chain too: binpack would pick the used card, mutex forbids it.
    req.containers[0].gpus = 1;
    req.gpu_policy = Some("binpack,mutex".parse().unwrap());
    assert_eq!(devices_on(&l, &req).unwrap(), "GPU-0,NVIDIA,1000,0:;");
}

/// Without link scores (the node has no `hami.io/node-nvidia-score`), HAMi's topology-aware pick
/// is the sort's; the policy is accepted, not refused as unknown.
#[test]
fn topology_aware_is_accepted_and_places_as_the_sort_without_link_scores() {
    let l = ledger_with(vec![
        card("GPU-0", 0, 10, 16000, "NVIDIA A100"),
        card("GPU-1", 1, 10, 16000, "NVIDIA A100"),
        card("GPU-2", 2, 10, 16000, "NVIDIA A100"),
    ]);
    let mut req = one(2, MemRequest::MiB(1000), 0);
    req.gpu_policy = Some("topology-aware".parse().unwrap());
    assert_eq!(
        devices_on(&l, &req).unwrap(),
        "GPU-2,NVIDIA,1000,0:GPU-1,NVIDIA,1000,0:;"
    );
}

#[test]
fn a_cordoned_card_answers_card_cordoned() {
    let mut l = Ledger::default();
    l.upsert_node_cordoned(
        "n",
        vec![
            card("GPU-0", 0, 10, 16000, "NVIDIA A100"),
            card("GPU-1", 1, 10, 16000, "NVIDIA A100"),
        ],
        vec!["GPU-1".into()],
    );
    assert_eq!(
        devices_on(&l, &one(1, MemRequest::MiB(1000), 0)).unwrap(),
        "GPU-0,NVIDIA,1000,0:;"
    );
    assert_eq!(
        devices_on(&l, &one(2, MemRequest::MiB(1000), 0)).unwrap_err(),
        "1/2 AllocatedCardsInsufficientRequest, 1/2 CardCordoned"
    );
    // Lifting the cordon gives the card back, and the book keeps what it held.
    l.upsert_node_cordoned(
        "n",
        vec![
            card("GPU-0", 0, 10, 16000, "NVIDIA A100"),
            card("GPU-1", 1, 10, 16000, "NVIDIA A100"),
        ],
        vec![],
    );
    assert!(devices_on(&l, &one(2, MemRequest::MiB(1000), 0)).is_ok());
}

/// HAMi's "fit fail: CardNotHealth" beside a healthy card with two asked.
#[test]
fn two_cards_one_unhealthy_two_asked_is_allocated_cards_insufficient_request() {
    let mut sick = card("GPU-0", 0, 10, 16000, "NVIDIA A100");
    sick.health = false;
    let l = ledger_with(vec![sick, card("GPU-1", 1, 10, 16000, "NVIDIA A100")]);
    assert_eq!(
        devices_on(&l, &one(2, MemRequest::MiB(1000), 0)).unwrap_err(),
        "1/2 AllocatedCardsInsufficientRequest, 1/2 CardNotHealth"
    );
}

/// With `deviceCoreScaling` 2 a card registers 200 cores: 100 is half of it, not "exclusive".
#[test]
fn exclusivity_applies_only_to_cards_that_register_100_cores() {
    let mut scaled = card("GPU-0", 0, 10, 16000, "NVIDIA A100");
    scaled.devcore = 200;
    let mut l = ledger_with(vec![scaled]);
    let whole = one(1, MemRequest::MiB(1000), 100);
    assert!(place(&mut l, "a", &["n"], &whole).chosen.is_some());
    assert!(
        place(&mut l, "b", &["n"], &whole).chosen.is_some(),
        "two 100-core pods share a 200-core card"
    );
    assert_eq!(
        place(&mut l, "c", &["n"], &whole).misses[0].1.to_string(),
        "1/1 CardInsufficientCore"
    );
    let mut l = ledger_with(vec![card("GPU-0", 0, 10, 16000, "NVIDIA A100")]);
    assert!(
        place(&mut l, "a", &["n"], &one(1, MemRequest::MiB(1000), 0))
            .chosen
            .is_some()
    );
    assert_eq!(
        place(&mut l, "b", &["n"], &whole).misses[0].1.to_string(),
        "1/1 ExclusiveDeviceAllocateConflict"
    );
}

#[test]
fn register_entries_whose_type_lacks_nvidia_are_not_cards() {
    let l = ledger_with(vec![
        card("MLU-0", 0, 10, 16000, "MLU370"),
        card("GPU-1", 1, 10, 16000, "NVIDIA A100"),
    ]);
    assert_eq!(l.node("n").unwrap().cards.len(), 1);
    assert_eq!(
        devices_on(&l, &one(2, MemRequest::MiB(1000), 0)).unwrap_err(),
        "NodeInsufficientDevice"
    );
}

/// A running pod with a 20000 MiB init container and a 10000 MiB app container holds 20000 MiB
/// (the init container has finished), so an 82400 MiB pod fits beside it on a 102400 MiB card.
#[test]
fn init_containers_book_the_larger_of_their_peak_and_the_app_sum() {
    let mut l = ledger_with(vec![card("GPU-0", 0, 10, 102400, "NVIDIA H200")]);
    let pod = PodRequest {
        containers: vec![
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(20000),
                cores: 0,
            },
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(10000),
                cores: 0,
            },
        ],
        init: 1,
        ..Default::default()
    };
    let d = place(&mut l, "with-init", &["n"], &pod);
    assert!(d.chosen.is_some());
    assert_eq!(
        l.placement("with-init").unwrap().devices.encode(),
        "GPU-0,NVIDIA,20000,0:;GPU-0,NVIDIA,10000,0:;"
    );
    assert_eq!(
        l.node("n").unwrap().usage[0],
        node::CardUsage {
            slots: 1,
            mem_mib: 20000,
            cores: 0
        }
    );
    assert!(
        place(&mut l, "big", &["n"], &one(1, MemRequest::MiB(82400), 0))
            .chosen
            .is_some()
    );
    // Two init containers run one after the other: each fits alone, their sum need not.
    let mut l = ledger_with(vec![card("GPU-0", 0, 10, 16000, "NVIDIA A100")]);
    let two_inits = PodRequest {
        containers: vec![
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(12000),
                cores: 0,
            },
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(12000),
                cores: 0,
            },
            ContainerRequest {
                gpus: 1,
                mem: MemRequest::MiB(4000),
                cores: 0,
            },
        ],
        init: 2,
        ..Default::default()
    };
    assert!(place(&mut l, "p", &["n"], &two_inits).chosen.is_some());
    assert_eq!(l.node("n").unwrap().usage[0].mem_mib, 12000);
    // App containers still add up.
    let mut l = ledger_with(vec![card("GPU-0", 0, 10, 16000, "NVIDIA A100")]);
    let two_apps = PodRequest {
        init: 0,
        ..two_inits.clone()
    };
    assert_eq!(
        place(&mut l, "p", &["n"], &two_apps).misses[0]
            .1
            .to_string(),
        "1/1 CardInsufficientMemory"
    );
}

/// The ledger reuses the slots a candidate list resolved to while the list repeats: a node that
/// leaves, and another that takes its slot, must not be mistaken for each other.
#[test]
fn a_repeated_candidate_list_follows_nodes_coming_and_going() {
    let mut l = Ledger::default();
    l.upsert_node("a", vec![card("GPU-a", 0, 10, 16000, "NVIDIA A100")]);
    l.upsert_node("b", vec![card("GPU-b", 0, 10, 8000, "NVIDIA A100")]);
    let nodes = ["a", "b"];
    let req = one(1, MemRequest::MiB(10000), 0);
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &Config::default()), &nodes),
        Some("a")
    );
    l.remove_node("a");
    l.upsert_node("c", vec![card("GPU-c", 0, 10, 16000, "NVIDIA A100")]);
    let d = l.decide(&nodes, &req, &Config::default());
    assert_eq!(chosen_node(&d, &nodes), None);
    assert_eq!(d.misses[0].1.to_string(), "NodeUnregistered");
    l.upsert_node("a", vec![card("GPU-a", 0, 10, 16000, "NVIDIA A100")]);
    assert_eq!(
        chosen_node(&l.decide(&nodes, &req, &Config::default()), &nodes),
        Some("a")
    );
}
