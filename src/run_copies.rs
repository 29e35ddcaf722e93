//! The `quiver pipeline run` copies of a pipeline, found in the consumer groups: their
//! members name them (`pipeline run NAME-N on HOST (pid P)`), and the broker knows nothing
//! else of them. `pipeline status` lists them beside the deployed instances, with the
//! group's other members (readers that are not the pipeline's, which take input partitions
//! from it), and `status` and `stop` of a pipeline that is only run point to the copies.

use futures::StreamExt;
use quiver_client::{Admin, Client};

/// Groups described at once while looking through every group.
const DESCRIBES_AT_ONCE: usize = 16;

/// An instance of a `quiver pipeline run` copy, as its group shows it (fields of
/// `pipeline status --output json`'s `run_copies`).
#[derive(Debug, serde::Serialize)]
pub struct RunCopy {
    /// Instance id, `NAME-N` (numbered from 1 in each copy).
    pub id: String,
    /// Where it runs: `HOST (pid P)`.
    pub process: String,
    /// Input partitions it owns now, as `topic/partition`.
    pub partitions: Vec<String>,
}

/// A member of a pipeline's group that is neither one of its deployed instances nor one of
/// its copies (a `consume --group` reader, another pipeline sharing the group, an
/// application): it takes input partitions from the pipeline (fields of `pipeline status
/// --output json`'s `other_members`).
#[derive(Debug, serde::Serialize)]
pub struct OtherMember {
    /// The client id it joined with.
    pub client_id: String,
    /// Its member id in the group.
    pub member_id: String,
    /// Input partitions it owns now, as `topic/partition`.
    pub partitions: Vec<String>,
}

/// The members of a pipeline's group, as `pipeline status` shows them beside its deployed
/// instances.
#[derive(Debug, Default)]
pub struct GroupMembers {
    /// The pipeline's `pipeline run` copies, by process then id.
    pub copies: Vec<RunCopy>,
    /// Members that are not the pipeline's, by client id.
    pub others: Vec<OtherMember>,
}

/// The copies of pipeline `pipeline` in `group`, by process then id; none when the group is
/// unknown or cannot be read. Members of other pipelines sharing the group are left out.
pub async fn in_group(client: &Client, group: &str, pipeline: &str) -> Vec<RunCopy> {
    members_of(client, group, pipeline).await.copies
}

/// The members of `group` that are `pipeline`'s copies, and those that are not the
/// pipeline's at all; nothing when the group is unknown or cannot be read.
pub async fn members_of(client: &Client, group: &str, pipeline: &str) -> GroupMembers {
    use quiver_pipeline::deployment::{deployed_instance_of, run_copy_of};
    let Ok(d) = Admin::new(client.clone()).describe_group(group).await else {
        return GroupMembers::default();
    };
    let mut found = GroupMembers::default();
    for m in &d.members {
        let partitions: Vec<String> = m
            .assigned
            .iter()
            .map(|tp| format!("{}/{}", tp.topic, tp.partition))
            .collect();
        if let Some((id, process)) = run_copy_of(&m.client_id) {
            if pipeline_of(id) == Some(pipeline) {
                found.copies.push(RunCopy {
                    id: id.to_string(),
                    process: process.to_string(),
                    partitions,
                });
                continue;
            }
        } else if deployed_instance_of(&m.client_id).and_then(pipeline_of) == Some(pipeline) {
            continue;
        }
        found.others.push(OtherMember {
            client_id: m.client_id.clone(),
            member_id: m.member_id.clone(),
            partitions,
        });
    }
    found
        .copies
        .sort_by(|a, b| (&a.process, &a.id).cmp(&(&b.process, &b.id)));
    found
        .others
        .sort_by(|a, b| (&a.client_id, &a.member_id).cmp(&(&b.client_id, &b.member_id)));
    found
}

/// The copies of a pipeline that is not deployed, with their groups: in the group named
/// like the pipeline (its default), else in any group with members (`[source] group` may
/// name another).
pub async fn anywhere(client: &Client, pipeline: &str) -> Vec<(String, Vec<RunCopy>)> {
    let own = in_group(client, pipeline, pipeline).await;
    if !own.is_empty() {
        return vec![(pipeline.to_string(), own)];
    }
    let Ok(groups) = Admin::new(client.clone()).list_groups().await else {
        return Vec::new();
    };
    let mut found: Vec<(String, Vec<RunCopy>)> = futures::stream::iter(
        groups
            .into_iter()
            .filter(|g| g.members > 0 && g.group != pipeline),
    )
    .map(|g| async move {
        let copies = in_group(client, &g.group, pipeline).await;
        (g.group, copies)
    })
    .buffer_unordered(DESCRIBES_AT_ONCE)
    .filter(|(_, copies)| std::future::ready(!copies.is_empty()))
    .collect()
    .await;
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// `N cop(y|ies) of it (is|are) running (ID on PROCESS, … in group G; …)`, for messages.
pub fn describe(found: &[(String, Vec<RunCopy>)]) -> String {
    let n: usize = found.iter().map(|(_, c)| c.len()).sum();
    let places: Vec<String> = found
        .iter()
        .map(|(group, copies)| {
            let who: Vec<String> = copies
                .iter()
                .map(|c| format!("{} on {}", c.id, c.process))
                .collect();
            format!("{} in group {group}", who.join(", "))
        })
        .collect();
    let (copies, are) = if n == 1 {
        ("copy", "is")
    } else {
        ("copies", "are")
    };
    format!(
        "{n} `quiver pipeline run` {copies} of it {are} running ({})",
        places.join("; ")
    )
}

/// The pipeline an instance id `NAME-N` belongs to.
fn pipeline_of(instance: &str) -> Option<&str> {
    let (name, n) = instance.rsplit_once('-')?;
    n.parse::<u32>().ok().map(|_| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_names_its_pipeline() {
        assert_eq!(pipeline_of("word-count-12"), Some("word-count"));
        assert_eq!(pipeline_of("wc-1"), Some("wc"));
        assert_eq!(pipeline_of("wc"), None);
        assert_eq!(pipeline_of("wc-x"), None);
    }

    #[test]
    fn copies_are_described_with_their_groups() {
        let copy = |id: &str, pid: u32| RunCopy {
            id: id.into(),
            process: format!("vm (pid {pid})"),
            partitions: Vec::new(),
        };
        let one = vec![("g".to_string(), vec![copy("p-1", 7)])];
        assert_eq!(
            describe(&one),
            "1 `quiver pipeline run` copy of it is running (p-1 on vm (pid 7) in group g)"
        );
        let two = vec![
            ("g".to_string(), vec![copy("p-1", 7), copy("p-1", 8)]),
            ("h".to_string(), vec![copy("p-2", 8)]),
        ];
        assert_eq!(
            describe(&two),
            "3 `quiver pipeline run` copies of it are running (p-1 on vm (pid 7), p-1 on vm (pid 8) in group g; p-2 on vm (pid 8) in group h)"
        );
    }
}
