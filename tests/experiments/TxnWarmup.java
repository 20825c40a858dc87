// The Java client's side of tests/experiments/exp_txn_warmup.py: the same transactions through
// kafka-clients (the broker's own jar), to tell the broker's warm-up from aiokafka's.
//
//   java -cp '<kafka>/libs/*' TxnWarmup.java BOOTSTRAP EVENTS CHECKPOINTS PRODUCERS SECONDS PREFIX
//
// Prints one line a transaction: "<began s> <send s> <commit s>", began counted from the moment
// every producer's initTransactions() returned. "send" is the sends and flush() (every record
// acknowledged), "commit" is commitTransaction().
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ConcurrentLinkedQueue;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class TxnWarmup {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], events = args[1], checkpoints = args[2];
        int count = Integer.parseInt(args[3]);
        double seconds = Double.parseDouble(args[4]);
        String prefix = args[5];
        List<KafkaProducer<byte[], byte[]>> producers = new ArrayList<>();
        List<Thread> starts = new ArrayList<>();
        for (int i = 0; i < count; i++) {
            Properties p = new Properties();
            p.put("bootstrap.servers", bootstrap);
            p.put("transactional.id", prefix + "-" + i);
            p.put("enable.idempotence", "true");
            p.put("acks", "all");
            p.put("linger.ms", "0");
            KafkaProducer<byte[], byte[]> producer =
                new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer());
            producers.add(producer);
            Thread t = new Thread(producer::initTransactions);
            t.start();
            starts.add(t);
        }
        for (Thread t : starts) t.join();
        ConcurrentLinkedQueue<String> rows = new ConcurrentLinkedQueue<>();
        long began = System.nanoTime();
        byte[] value = new byte[300];
        List<Thread> shards = new ArrayList<>();
        for (int i = 0; i < count; i++) {
            final int shard = i;
            final KafkaProducer<byte[], byte[]> producer = producers.get(i);
            Thread t = new Thread(() -> {
                while ((System.nanoTime() - began) / 1e9 < seconds) {
                    long start = System.nanoTime();
                    producer.beginTransaction();
                    for (int n = 0; n < 20; n++) {
                        producer.send(new ProducerRecord<>(events, shard % 32, ("k" + n).getBytes(), value));
                    }
                    producer.send(new ProducerRecord<>(checkpoints, shard % 32, "c".getBytes(), value));
                    producer.flush();
                    long sent = System.nanoTime();
                    producer.commitTransaction();
                    long done = System.nanoTime();
                    rows.add(String.format("%.4f %.4f %.4f", (start - began) / 1e9, (sent - start) / 1e9, (done - sent) / 1e9));
                    long left = 100_000_000L - (System.nanoTime() - start);
                    if (left > 0) {
                        try { Thread.sleep(left / 1_000_000L); } catch (InterruptedException e) { return; }
                    }
                }
            });
            t.start();
            shards.add(t);
        }
        for (Thread t : shards) t.join();
        for (KafkaProducer<byte[], byte[]> producer : producers) producer.close();
        for (String row : rows) System.out.println(row);
    }
}
