use livemig_sim::{BlockSpec, GuestSpec, Scenario, WorkingSet, run_migration};

#[test]
fn smoke() {
    let mut s = Scenario::new(vec![BlockSpec::new("pc.ram", 16384, 4096)]);
    s.fill_pages = 2000;
    s.guest = Some(GuestSpec {
        working_set: WorkingSet {
            block: 0,
            first_page: 100,
            pages: 1024,
        },
        rate_pages_per_sec: 20_000,
        seed: 1,
    });
    let o = run_migration(&s).unwrap();
    println!("{o:#?}");
    assert!(o.verified());
}
